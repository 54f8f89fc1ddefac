"""The installed package: latentwire.* only, never the bare names other PyPI projects own."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TAKEN = {"kernels", "protocol", "scheduler", "pipelines", "tests", "bench"}
VENVS = [p.name for p in REPO.iterdir() if (p / "pyvenv.cfg").exists()]  # .venv, .venv-latest: not the package's


def _top_levels(paths):
    return {Path(p).parts[0] for p in paths}


def test_subpackages_import_under_latentwire():
    import latentwire
    import latentwire.kernels
    import latentwire.pipelines
    import latentwire.protocol
    import latentwire.scheduler

    assert latentwire.protocol.encode and latentwire.__version__


def _outside_checkout(code, tmp_path):
    """Run ``code`` in this interpreter from a folder outside the checkout (a cwd on sys.path would
    let ``import kernels`` find the repository's folder, which is not what an installed user sees)."""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out)


def test_bare_names_do_not_import_from_the_installed_package(tmp_path):
    found = _outside_checkout(
        "import importlib.util, json; print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) "
        "for n in ('kernels', 'protocol', 'scheduler', 'pipelines')}))", tmp_path)
    venv = Path(sys.prefix).resolve()  # which may live inside the checkout (.venv)
    for name, origin in found.items():
        own = origin is not None and Path(origin).resolve().is_relative_to(REPO)
        assert not own or Path(origin).resolve().is_relative_to(venv), (name, origin)


def test_installed_distribution_files_are_all_under_latentwire(tmp_path):
    files = _outside_checkout(
        "import importlib.metadata as m, json; print(json.dumps([str(f) for f in m.distribution('latentwire').files]))",
        tmp_path)
    assert files, "latentwire is not installed"
    assert not _top_levels(files) & TAKEN, files


@pytest.fixture(scope="module")
def target_install(tmp_path_factory):
    """A real (non-editable) install of a copy of this checkout into an empty folder."""
    src = tmp_path_factory.mktemp("src") / "latentwire"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*VENVS, ".git", "build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-P", "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, timeout=300,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return target


def test_a_real_install_holds_only_latentwire(target_install):
    assert _top_levels(p.relative_to(target_install) for p in target_install.iterdir()) & TAKEN == set()
    (dist_info,) = target_install.glob("latentwire-*.dist-info")
    assert (dist_info / "top_level.txt").read_text().split() == ["latentwire"]
    record = [line.split(",")[0] for line in (dist_info / "RECORD").read_text().splitlines()]
    scripts = [r for r in record if r.startswith("..")]
    assert all(r.endswith("bin/latentwire") for r in scripts), scripts  # the console command
    tops = _top_levels(r for r in record if r not in scripts)
    assert tops == {"latentwire", dist_info.name}, tops
    assert {"latentwire/protocol/wire.py", "latentwire/kernels/__init__.py", "latentwire/protocol/SPEC.md",
            "latentwire/protocol/vectors.json", "latentwire/cli.py"} <= set(record)
    assert not any(r.startswith(("latentwire/tests/", "latentwire/bench/")) or r == "latentwire/setup.py"
                   for r in record)
    # every package of the checkout is installed (a subpackage setup.py forgot would import only in place)
    packages = {"latentwire/" + str(p.relative_to(REPO)) for p in REPO.rglob("__init__.py")
                if p.parts[len(REPO.parts)] not in ("tests", "bench", "build", ".git", *VENVS)}
    assert packages <= set(record), packages - set(record)
    assert "latentwire/pipelines/diffusionx/predictor.json" in record  # the predictor's weights travel
    # the embedded models and the judge travel with the package: the daemons and the demo load them
    assets = "latentwire/pipelines/assets/"
    shipped = {str(p.relative_to(REPO / "pipelines" / "assets")) for p in (REPO / "pipelines" / "assets").rglob("*")
               if p.is_file()}
    assert {assets + f for f in shipped} <= set(record), {assets + f for f in shipped} - set(record)
    assert {"judge.pt", "world-sd-cloud/unet/diffusion_pytorch_model.safetensors",
            "world-sd-edge/unet/diffusion_pytorch_model.safetensors"} <= shipped
    # the cost model's profiles travel too: `latentwire cost` names them
    data = REPO / "scheduler" / "cost" / "data"
    profiles = {"latentwire/scheduler/cost/data/" + str(p.relative_to(data)) for p in data.rglob("*.json")}
    assert profiles <= set(record), profiles - set(record)
    assert any(p.startswith("latentwire/scheduler/cost/data/devices/") for p in profiles)
    assert any(p.startswith("latentwire/scheduler/cost/data/links/") for p in profiles)
    assert {"latentwire/scheduler/cost/model.py", "latentwire/scheduler/cost/profiles.py",
            "latentwire/scheduler/cost/data/README.md"} <= set(record)


def test_a_real_install_loads_a_shipped_profile(target_install, tmp_path):
    code = ("import json; from latentwire.scheduler.cost.profiles import DATA, list_profiles, load_device, load_link; "
            "names = list_profiles(); print(json.dumps([DATA, names, load_device(names['devices'][0]).name, "
            "load_link(names['links'][0]).name]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(target_install)})
    assert out.returncode == 0, out.stderr
    data, names, device, link = json.loads(out.stdout)
    assert data.startswith(str(target_install)) and names["devices"] and names["links"]
    assert (device, link) == (names["devices"][0], names["links"][0])


def _cli():
    return str(Path(sys.executable).with_name("latentwire"))


def test_command_line_help():
    out = subprocess.run([_cli(), "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "codecs" in out and "edge" in out


def test_codecs_demo_prints_every_codec():
    out = subprocess.run([_cli(), "codecs", "--shape", "1", "4", "8", "8", "--level", "0", "3"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    for codec in ("fp32", "fp16", "bf16", "int8", "int4"):
        assert f"  {codec} " in out
    assert "x_t early" in out and "bits/value" in out
