"""DiffusionX's prompt session (pipelines/diffusionx/session.py): previews on the edge, the final refined by
the cloud from the last preview's clean x_0 and the seed; one process against the plan it runs, and two
real processes against one."""
import json
from pathlib import Path

import daemons
import numpy as np
import pytest
from runcli import run_cli
import torch
from PIL import Image

from latentwire.pipelines import evaluate, judge, world
from latentwire.pipelines.diffusionx import PromptSession, SessionError
from latentwire.pipelines.embedded import CLOUD_PATH, EDGE_PATH
from latentwire.pipelines.models.sd import StableDiffusionModel
from latentwire.scheduler import SessionSpec, make, run_plan
from latentwire.scheduler.serving.edge import EdgeClient
from latentwire.scheduler.wire import Codecs

EXACT = Codecs(latent=("fp32", 0), state=("fp32", 0))
WAIT_S = 60
FIRST, FINAL = "a red circle at the top left", "a blue circle at the top left"


@pytest.fixture(scope="module")
def models():
    return {"cloud": StableDiffusionModel.from_pretrained(CLOUD_PATH),
            "edge": StableDiffusionModel.from_pretrained(EDGE_PATH)}


def test_a_final_of_an_unchanged_prompt_is_the_preview_refine_plan(models):
    # a preview of the final schedule's length, then the final with the same prompt: the plan preview-refine
    session = PromptSession(models["edge"], models["cloud"], steps=10, preview_steps=10, seed=3, guidance_scale=3.0)
    preview = session.preview(FIRST)
    final = session.finalize(strength=0.4)
    s = models["edge"].make_scheduler("DDIMScheduler")
    spec = SessionSpec(prompt=FIRST, plan=make("preview-refine", 10, strength=0.4), scheduler="DDIMScheduler",
                       scheduler_config=dict(s.config), guidance_scale=3.0, seed=3)
    expected, summary = run_plan(spec, models)
    assert torch.equal(final.latent, expected)
    assert (preview.edge_calls, final.cloud_calls) == (summary.edge_model_calls, summary.cloud_model_calls) == (10, 4)
    assert [r.kind for r in session.rounds] == ["preview", "final"] and final.prompt == FIRST


def test_rounds_from_fresh_noise_or_from_the_previous_preview(models):
    fresh = PromptSession(models["edge"], models["cloud"], preview_steps=8, seed=5)
    again = PromptSession(models["edge"], models["cloud"], preview_steps=8, seed=5, from_previous=True,
                          preview_strength=0.5)
    a, b = fresh.preview(FIRST), again.preview(FIRST)
    assert torch.equal(a.latent, b.latent) and a.start == b.start == "fresh"  # the first round: nothing before it
    a2, b2 = fresh.preview(FINAL), again.preview(FINAL)
    assert (a2.edge_calls, a2.start) == (8, "fresh") and (b2.edge_calls, b2.start, b2.strength) == (4, "previous", 0.5)
    assert not torch.equal(a2.latent, b2.latent)
    # both read as the new prompt: the re-noised preview took the new colour too
    images = evaluate.to_pixels(models["edge"], torch.cat([a2.latent, b2.latent]))
    scores = judge.attribute_scores(images, [world.parse_caption(FINAL)] * 2)
    assert scores["colour"] == 1.0
    with pytest.raises(SessionError, match="needs a preview first"):
        PromptSession(models["edge"], models["cloud"]).finalize()
    with pytest.raises(SessionError, match="no cloud"):
        s = PromptSession(models["edge"])
        s.preview(FIRST)
        s.finalize()
    for bad, says in (({"strength": 0}, "strength"), ({"prompt": ""}, "prompt")):
        with pytest.raises(SessionError, match=says):
            fresh.finalize(**bad)
    with pytest.raises(SessionError, match="preview_steps"):
        PromptSession(models["edge"], preview_steps=1)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    bind = f"ipc://{tmp_path_factory.mktemp('ipc')}/cloud.sock"
    proc = daemons.start("cloud", "--model", str(CLOUD_PATH), "--bind", bind)
    yield bind
    assert daemons.stop(proc) == 0


def test_a_session_across_two_processes_equals_one_process(models, cloud):
    client = EdgeClient(cloud, models["edge"], codecs=EXACT, timeout_s=WAIT_S)
    split = PromptSession(models["edge"], client, seed=11, guidance_scale=3.0)
    here = PromptSession(models["edge"], models["cloud"], seed=11, guidance_scale=3.0)
    for session in (split, here):
        session.preview(FIRST)
        session.preview(FINAL)
    final, expected = split.finalize(strength=0.6), here.finalize(strength=0.6)
    assert torch.equal(final.latent, expected.latent) and final.cloud_calls == expected.cloud_calls == 12
    assert final.bytes_up > final.latent.numel() * 4 and final.bytes_down > final.latent.numel() * 4  # x_0 up, x down
    assert final.load["running"] == 1 and final.load["queued"] == 0 and 0 < final.load["utilisation"] <= 1
    assert set(final.to_plain()) >= {"kind", "prompt", "wall_s", "cloud_calls", "strength", "load", "bytes_up"}
    assert "latent" not in final.to_plain()


def _cli(*args, stdin=""):
    return run_cli("session", *args, stdin=stdin)


def test_the_session_command_from_a_rounds_file_and_typed(models, cloud, tmp_path):
    rounds = tmp_path / "rounds.jsonl"
    rounds.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": FIRST}, {"prompt": FINAL}, {"final": True, "strength": 0.6})) + "\n")
    out = tmp_path / "out"
    r = _cli("--connect", cloud, "--rounds", str(rounds), "--seed", "11", "--guidance", "3", "--latent-codec", "fp32",
             "--out-dir", str(out), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["round"], x["kind"]) for x in lines] == [(1, "preview"), (2, "preview"), (3, "final")]
    assert lines[-1]["prompt"] == FINAL and lines[-1]["cloud_calls"] == 12 and lines[-1]["load"]["running"] == 1
    assert all(Path(x["image"]).exists() for x in lines) and lines[-1]["image"].endswith("final.png")
    # the same session in this process: the same final image
    here = PromptSession(models["edge"], models["cloud"], seed=11, guidance_scale=3.0)
    here.preview(FIRST)
    here.preview(FINAL)
    expected = models["edge"].decode(here.finalize(strength=0.6).latent)[0]
    assert (np.asarray(Image.open(lines[-1]["image"])) == np.asarray(expected)).all()
    typed = _cli("--connect", cloud, "--out-dir", str(tmp_path / "typed"), "--json",
                 stdin=f"{FIRST}\n/final {FINAL}\n")
    assert typed.returncode == 0, typed.stderr[-3000:]
    kinds = [(x["kind"], x["prompt"]) for x in map(json.loads, typed.stdout.splitlines())]
    assert kinds == [("preview", FIRST), ("final", FINAL)]
    bad = tmp_path / "bad.jsonl"
    for second in ('{"colour": "red"}', '{"final": true, "strength": "0.5"}', '{"final": true, "strength": 2}',
                   '{"prompt": 3}'):
        bad.write_text('{"prompt": "a"}\n' + second + "\n")
        r = _cli("--connect", cloud, "--rounds", str(bad), "--out-dir", str(tmp_path / "bad"))
        assert r.returncode != 0 and "line 2" in r.stderr and "Traceback" not in r.stderr, second
