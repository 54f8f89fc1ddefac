"""The schedulers a model folder ships: SD v1.5-style folders with their own PNDMScheduler, a scheduler
swapped in the diffusers way (`--scheduler NAME`, `scheduler=` in the Python API), and clear errors,
never a traceback, for what the fused step cannot run. Real daemons over ipc://."""
import json

import daemons
import pytest
from runcli import run_cli
import torch

from latentwire.kernels import UnsupportedScheduler
from latentwire.pipelines.models.sd import StableDiffusionModel
from latentwire.pipelines.models.tiny import save_tiny_pair
from latentwire.scheduler import SessionSpec, run_plan
from latentwire.scheduler.serving.edge import EdgeClient
from latentwire.scheduler.wire import Codecs

EXACT = Codecs(latent=("fp32", 0), state=("fp32", 0))
WAIT_S = 120
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pndm_pair(tmp_path_factory):
    """Tiny SD folders whose scheduler is PNDM, as SD v1.5's and BK-SDM's are."""
    cloud_path, edge_path = save_tiny_pair(tmp_path_factory.mktemp("pndm"), seed=0, scheduler="PNDMScheduler")
    return str(cloud_path), str(edge_path)


@pytest.fixture(scope="module")
def models(pndm_pair):
    return {"cloud": StableDiffusionModel.from_pretrained(pndm_pair[0]),
            "edge": StableDiffusionModel.from_pretrained(pndm_pair[1])}


@pytest.fixture(scope="module")
def cloud(pndm_pair, tmp_path_factory):
    bind = f"ipc://{tmp_path_factory.mktemp('ipc')}/pndm.sock"
    proc = daemons.start("cloud", "--model", pndm_pair[0], "--bind", bind)
    yield bind
    assert daemons.stop(proc) == 0


def _edge(bind, model_path, out, *flags):
    return run_cli("edge", "--connect", bind, "--model", model_path, "--prompt", PROMPT, "--out", str(out), "--steps",
                   "6", "--seed", "2", "--json", *flags)


def test_a_scheduler_swapped_in_the_diffusers_way_serves_a_split(cloud, pndm_pair, models, tmp_path):
    run = _edge(cloud, pndm_pair[1], tmp_path / "ddim.png", "--scheduler", "DDIMScheduler", "--plan", "hybrid-sd")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert (summary["cloud_model_calls"], summary["edge_model_calls"]) == (2, 4)
    # the Python API's spec is the same session, and the split equals one process
    spec = SessionSpec.for_model(models["edge"], PROMPT, plan="hybrid-sd", steps=6, scheduler="DDIMScheduler", seed=2)
    assert spec.scheduler == "DDIMScheduler" and spec.scheduler_config["beta_schedule"] == "scaled_linear"
    latent, _ = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=WAIT_S).generate(spec)
    assert torch.equal(latent, run_plan(spec, models)[0])


@pytest.mark.parametrize("plan", ["hybrid-sd", "cloud-only"])
def test_a_folder_with_its_own_pndm_scheduler_splits_with_plms_state_crossing(cloud, pndm_pair, models, tmp_path,
                                                                             plan):
    run = _edge(cloud, pndm_pair[1], tmp_path / "pndm.png", "--plan", plan)  # no --scheduler: the folder's PNDM
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["cloud_model_calls"] + summary["edge_model_calls"] == 7  # PLMS: 6 inference steps, 7 calls
    spec = SessionSpec.for_model(models["edge"], PROMPT, plan=plan, steps=6, seed=2)
    assert spec.scheduler == "PNDMScheduler" and spec.plan.num_steps == 7 and spec.inference_steps == 6
    latent, _ = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=WAIT_S).generate(spec)
    assert torch.equal(latent, run_plan(spec, models)[0])  # the PLMS history crossed with the latent


def test_pndm_cloud_only_over_the_network_equals_the_diffusers_pipeline(cloud, pndm_pair, models):
    from diffusers import StableDiffusionPipeline

    spec = SessionSpec.for_model(models["edge"], PROMPT, plan="cloud-only", steps=6, seed=2, guidance_scale=6.0)
    latent, _ = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=WAIT_S).generate(spec)
    pipe = StableDiffusionPipeline.from_pretrained(pndm_pair[0], safety_checker=None, requires_safety_checker=False)
    expected = pipe(PROMPT, num_inference_steps=6, guidance_scale=6.0, generator=torch.Generator().manual_seed(2),
                    output_type="latent").images
    assert ((latent - expected).abs().max() / expected.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("flags, message", [
    (["--scheduler", "HeunDiscreteScheduler"], "scheduler HeunDiscreteScheduler is not supported"),
    (["--scheduler", "NoSuchScheduler"], "is not a diffusers scheduler class"),
    (["--plan", "hybrid-sd", "--k", "99"], "hybrid-sd k"),
])
def test_what_the_fused_step_cannot_run_is_a_clear_error_before_the_cloud_is_asked(pndm_pair, tmp_path, flags,
                                                                                  message):
    run = _edge("ipc:///nonexistent", pndm_pair[1], tmp_path / "x.png", *flags)
    assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr


def test_the_python_api_names_the_supported_schedulers_and_the_flag(models):
    with pytest.raises(UnsupportedScheduler, match="supported: .*DDIMScheduler.*--scheduler NAME"):
        SessionSpec.for_model(models["edge"], PROMPT, scheduler="HeunDiscreteScheduler")
