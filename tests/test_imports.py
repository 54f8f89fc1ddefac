"""Runtime modules never import the training scripts: each import runs in a fresh interpreter, so what one
test imported cannot hide what another needs."""
import json
import subprocess
import sys

import pytest

RUNTIME = ["latentwire.pipelines.ideal", "latentwire.pipelines.evaluate", "latentwire.pipelines.world"]
TRAINING = ["latentwire.pipelines.train_models", "latentwire.pipelines.train_judge"]
IMPORT_TIMEOUT_S = 120  # torch, diffusers and triton on a slow, shared machine


def imported_by(code):
    """The latentwire modules in sys.modules after running ``code`` in a fresh interpreter."""
    report = "import json, sys; print(json.dumps(sorted(m for m in sys.modules if m.startswith('latentwire'))))"
    run = subprocess.run([sys.executable, "-P", "-c", f"{code}\n{report}"], capture_output=True, text=True,
                         timeout=IMPORT_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("module", RUNTIME)
def test_a_runtime_module_does_not_import_the_training_scripts(module):
    modules = imported_by(f"import {module}")
    assert module in modules  # the check saw the import it is about
    assert not set(TRAINING) & set(modules)


def test_loading_the_exact_denoiser_does_not_import_the_training_scripts():
    # it once took its training set's seed from train_models, inside from_pretrained
    modules = imported_by("from latentwire.pipelines import embedded\n"
                          "from latentwire.pipelines.ideal import IdealDenoiser\n"
                          "IdealDenoiser.from_pretrained(embedded.CLOUD_PATH, per_scene=1)")
    assert "latentwire.pipelines.models.sd" in modules and not set(TRAINING) & set(modules)


def test_the_training_script_takes_the_evaluation_settings_from_the_runtime():
    from latentwire.pipelines import evaluate, train_models

    assert (train_models.EVAL_SEED, train_models.EVAL_GUIDANCE) == (evaluate.EVAL_SEED, evaluate.EVAL_GUIDANCE)
