"""A fresh machine, as a new user has it: every launch path works from the repository root, where the
root's ``kernels/`` would shadow Hugging Face's ``kernels`` (which transformers requires and diffusers
imports); no folder of the checkout shadows an installed module; and latentwire imports, hands off and
steps without Triton, as on a Mac or Windows edge. These start real interpreters: the working directory
and ``sys.path`` of a new process are what is tested."""
import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import daemons
import pytest

from latentwire.pipelines.models.tiny import save_tiny_pair
from latentwire.scheduler.serving.edge import EdgeClient
from latentwire.scheduler.serving.process import Child, child_env

REPO = Path(__file__).resolve().parents[1]
# Folders that put modules on sys.path under their own names: the root (a process started there), tests/
# (pytest's pythonpath) and bench/ (a script run there has its folder first on its path).
PATH_FOLDERS = (REPO, REPO / "tests", REPO / "bench")
TIMEOUT_S = 180  # an interpreter that imports torch, diffusers and transformers on a slow, shared machine


def _exposed(folder):
    """The module names ``folder`` provides when it is on sys.path: packages (a folder with __init__.py;
    a folder without one is a namespace portion, which any real module elsewhere beats) and .py files."""
    names = {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names | {p.stem for p in folder.glob("*.py")}


def _installed():
    """{top-level module name: distributions that provide it}, latentwire's own left out."""
    found = importlib.metadata.packages_distributions()
    return {name: dists for name, dists in found.items() if set(dists) - {"latentwire"}}


def test_only_the_guarded_root_packages_share_a_name_with_an_installed_module():
    # kernels/, protocol/, scheduler/, pipelines/ are the user's layout; a process started in the root
    # has them on its path, and latentwire takes the root off (tested below). A module of tests/ or bench/
    # named like an installed one would shadow it in pytest or in a bench script: rename it.
    installed = _installed()
    assert "kernels" in installed, "transformers requires Hugging Face's kernels: the clash below is real"
    guarded = {"kernels", "protocol", "scheduler", "pipelines"}
    for folder in PATH_FOLDERS:
        clashes = {n: installed[n] for n in _exposed(folder) & set(installed)}
        allowed = guarded if folder == REPO else set()
        assert set(clashes) <= allowed, f"{folder} shadows installed modules: {clashes}"


RESOLVE = """
import importlib.util, json, sys
{pre}
names = {names!r}
print(json.dumps({{n: getattr(importlib.util.find_spec(n), "origin", None) for n in names}}))
"""


def _in_checkout(path):
    """Whether ``path`` is one of the checkout's own files (the venv may live inside the checkout too)."""
    path = Path(path).resolve()
    return path.is_relative_to(REPO) and not path.is_relative_to(Path(sys.prefix).resolve())


@pytest.mark.parametrize("how", ["python -c, latentwire first", "python -c, root on PYTHONPATH", "python -P -c"])
def test_from_the_root_no_bare_name_resolves_into_the_checkout(how):
    names = sorted(_exposed(REPO))
    if how == "python -P -c":  # the launcher's way: nothing of the root on the path from the start
        cmd, env, pre = [sys.executable, "-P", "-c"], child_env(), ""
    else:  # a user's way: '' (or the root itself) first on sys.path until latentwire is imported
        cmd, env, pre = [sys.executable, "-c"], dict(child_env(), PYTHONSAFEPATH=""), "import latentwire"
        if "PYTHONPATH" in how:
            env["PYTHONPATH"] = str(REPO)
    run = subprocess.run([*cmd, RESOLVE.format(pre=pre, names=names)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    origins = json.loads(run.stdout.splitlines()[-1])
    inside = {n: o for n, o in origins.items() if o and _in_checkout(o)}
    assert not inside, f"{how}: these resolve into the checkout: {inside}"
    # the clash is real, and the installed module wins it
    assert origins["kernels"] and "site-packages" in origins["kernels"], origins["kernels"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("fresh") / "models", seed=0)


@pytest.mark.parametrize("how", ["latentwire cloud", "python -m latentwire.cli cloud"])
def test_a_cloud_started_from_the_root_as_a_user_starts_it_serves(how, tiny, tmp_path):
    # both load the model through diffusers' whole import chain (the UNet, the VAE, the text encoder),
    # which imports Hugging Face's kernels; from the root, `python -m` puts the root first on sys.path
    prog = [daemons.CLI] if how == "latentwire cloud" else [sys.executable, "-m", "latentwire.cli"]
    bind = f"ipc://{tmp_path}/cloud.sock"
    env = {k: v for k, v in child_env().items() if k != "PYTHONSAFEPATH"}  # as a user's shell has it
    cloud = Child([*prog, "cloud", "--bind", bind, "--model", str(tiny[0]), "--threads", "1"],
                  log=tmp_path / "cloud.log", cwd=REPO, env=env, name=how)
    cloud.wait_ready("serving", daemons.READY_TIMEOUT_S)
    try:
        health = EdgeClient(bind, None, timeout_s=60).health()
        assert health["status"] == "ok"
    finally:
        assert cloud.stop() == 0, cloud.stderr_tail()
    assert "Traceback" not in (tmp_path / "cloud.log").read_text()


NO_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as where it has no wheels
import torch
from diffusers import DDIMScheduler
from latentwire import kernels, protocol
from latentwire.kernels import FusedSampler, _triton, quantize

assert not _triton.AVAILABLE and "triton" not in [m.split(".")[0] for m in sys.modules if sys.modules[m]]
torch.manual_seed(0)
x = torch.randn(1, 4, 9, 7)
frames = protocol.encode_handoff(protocol.Handoff(latent=x, step_index=3, timestep=701.0, seed=7))
back = protocol.decode_handoff(frames)
assert back.step_index == 3 and (back.latent - x).abs().max() < 0.05, (back.latent - x).abs().max()

s = DDIMScheduler(num_train_timesteps=1000)
s.set_timesteps(10)
cond, uncond = torch.randn_like(x), torch.randn_like(x)
ours, _ = FusedSampler(s).step(x, 0, cond=cond, uncond=uncond, guidance_scale=7.5)
theirs = s.step(uncond + 7.5 * (cond - uncond), s.timesteps[0], x).prev_sample
torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
x3 = x.reshape(1, 4, -1).contiguous()
assert quantize._default_backend(torch.device("cuda")) == "ref"  # a CUDA edge without Triton: the torch path
try:
    quantize.channel_minmax(x3, backend="triton")
    raise SystemExit("backend='triton' without Triton was not refused")
except quantize.QuantizeInputError as e:
    assert "not installed" in str(e), e
print("ok")
"""


def test_latentwire_imports_hands_off_and_steps_without_triton():
    run = subprocess.run([sys.executable, "-P", "-c", textwrap.dedent(NO_TRITON)], capture_output=True, text=True,
                         timeout=TIMEOUT_S, env=child_env(), cwd=REPO)
    assert run.returncode == 0 and run.stdout.split()[-1] == "ok", run.stderr[-3000:]


def test_triton_is_required_only_where_it_has_wheels():
    requires = importlib.metadata.requires("latentwire")
    (triton,) = [r for r in requires if r.split(";")[0].strip() == "triton"]
    assert 'sys_platform == "linux"' in triton.replace("'", '"'), triton
