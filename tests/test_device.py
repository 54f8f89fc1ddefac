"""Devices and dtypes: `latentwire cloud --device cpu --dtype bfloat16` serves a split session to a bfloat16
edge across two real processes, equal bit for bit to the one-process run of the same bfloat16 models;
what crosses the wire does not depend on the sender's device; the device flags fail clearly."""
import json
import subprocess
import sys

import daemons
import pytest
from runcli import run_cli
import torch

from latentwire.kernels import SolverState
from latentwire.pipelines.models.sd import StableDiffusionModel
from latentwire.pipelines.models.tiny import save_tiny_pair
from latentwire.scheduler import SessionSpec, make, run_plan, wire
from latentwire.scheduler.serving.edge import EdgeClient
from latentwire.scheduler.wire import Codecs

EXACT = Codecs(latent=("fp32", 0), state=("fp32", 0))  # a bfloat16 latent goes as fp32: exact
WAIT_S = 60


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cloud_path, edge_path = save_tiny_pair(tmp_path_factory.mktemp("models"), seed=0)
    return str(cloud_path), str(edge_path)


@pytest.fixture(scope="module")
def bf16(pair):
    return {side: StableDiffusionModel.from_pretrained(path, dtype=torch.bfloat16)
            for side, path in zip(("cloud", "edge"), pair)}


def _spec(model, plan, scheduler="DPMSolverMultistepScheduler"):
    s = model.make_scheduler(scheduler)
    return SessionSpec(prompt="a red circle", plan=plan, scheduler=type(s).__name__,
                       scheduler_config=dict(s.config), guidance_scale=5.0, seed=4)


def test_a_bfloat16_split_across_two_processes_equals_one_process(pair, bf16, tmp_path):
    bind = f"ipc://{tmp_path}/bf16.sock"
    proc = daemons.start("cloud", "--model", pair[0], "--bind", bind, "--device", "cpu", "--dtype", "bfloat16")
    try:
        for plan in (make("hybrid-sd", 8, k=3), make("ec-diff", 10, p=2, k=1, a=0.5, s=6)):
            spec = _spec(bf16["cloud"], plan)
            latent, summary = EdgeClient(bind, bf16["edge"], codecs=EXACT, timeout_s=WAIT_S).generate(spec)
            expected, reference = run_plan(spec, bf16)
            assert latent.dtype == torch.bfloat16 and torch.isfinite(latent.float()).all()
            assert torch.equal(latent, expected)
            assert (summary.cloud_model_calls, summary.edge_model_calls) == (reference.cloud_model_calls,
                                                                             reference.edge_model_calls)
        # and the edge command, in bfloat16 too
        out = tmp_path / "bf16.png"
        run = run_cli("edge", "--connect", bind, "--model", pair[1], "--dtype", "bfloat16", "--prompt", "a red circle",
                      "--plan", "hybrid-sd", "--steps", "6", "--out", str(out), "--json")
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["cloud_model_calls"] == 2 and out.stat().st_size > 0
    finally:
        assert daemons.stop(proc) == 0


def test_what_crosses_the_wire_is_encoded_from_a_cpu_copy_whatever_the_tensors_layout():
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    spec = SessionSpec(prompt="a", plan=make("cloud-only", 2), scheduler="DDIMScheduler")
    frames = wire.Run(spec, (0, 1), latent=x).to_frames()
    # a non-contiguous view of the same values (as a slice of a batch on a device would be) sends the same bytes
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous() and torch.equal(strided, x)
    assert [bytes(f) for f in wire.Run(spec, (0, 1), latent=strided).to_frames()] == [bytes(f) for f in frames]
    h = wire.Handoff(x, 1, 500.0, 4, SolverState(x0_prev=x.float()), 1, 0, 7)
    back = wire.parse_reply(h.to_frames(EXACT))
    assert torch.equal(back.latent, x) and back.latent.dtype == torch.bfloat16 and back.worker == 7


@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], "no CUDA device" if not torch.cuda.is_available() else None),
    (["--device", "toaster"], "is not a torch device"),
    (["--dtype", "float64"], "invalid choice"),
])
def test_device_flags_fail_clearly(flags, message):
    if message is None:
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    run = run_cli("edge", "--prompt", "a red circle", "--out", "x.png", *flags)
    assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr


def test_a_bad_out_path_fails_before_the_generation(tmp_path):
    for out, message in ((tmp_path / "image.txt", "must end in one of"),
                         (tmp_path / "missing" / "image.png", "does not exist")):
        run = run_cli("edge", "--connect", "ipc:///nonexistent", "--prompt", "a red circle", "--out", str(out),
                      "--timeout", "600")
        assert run.returncode != 0 and message in run.stderr  # at once: it never waited on the missing cloud


def test_latentwire_keys_imports_no_torch(tmp_path):
    code = ("import sys; from latentwire.cli import main; main(['keys', sys.argv[1], 'alice']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    run = subprocess.run([sys.executable, "-P", "-c", code, str(tmp_path)], capture_output=True, text=True,
                         timeout=WAIT_S)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "alice.key").exists() and (tmp_path / "alice.key_secret").exists()
