"""DiffusionX's noise-level predictor (pipelines/diffusionx/predictor.py): its inputs from what an edge has, its
logistic fit, its objective's response to the cloud's load, the shipped weights, and `latentwire
predict-noise`."""
import json
import math
import random

import pytest
from runcli import run_cli

from latentwire.pipelines.diffusionx import PromptSession
from latentwire.pipelines.diffusionx.predictor import (FEATURES, STRENGTHS, WEIGHTS_PATH, NoisePredictor,
                                                       PredictorError, features, fit, from_profiles, log_loss,
                                                       word_edits)
from latentwire.pipelines.embedded import CLOUD_PATH, EDGE_PATH
from latentwire.pipelines.models.sd import StableDiffusionModel

SAME = ("a red circle at the top left", "a red circle at the top left")
ONE = ("a red circle at the top left", "a blue circle at the top left")
THREE = ("a red circle at the top left", "a blue square at the bottom left")


def test_word_edits_count_insertions_deletions_and_substitutions():
    assert word_edits(*SAME) == 0 and word_edits(*ONE) == 1 and word_edits(*THREE) == 3
    assert word_edits("a red circle", "a big red circle") == 1 and word_edits("a b c", "") == 3


def test_the_fit_recovers_a_known_logistic_model():
    truth = {"bias": -2.0, "embed_distance": -20.0, "word_edits": -1.0, "strength": 6.0,
             "strength*embed_distance": 10.0, "strength*word_edits": 1.0, "strength^2": -1.0}
    model = NoisePredictor(truth, cost=None)
    rng = random.Random(0)
    rows, labels = [], []
    for _ in range(4000):
        d, e, s = rng.uniform(0, 0.2), rng.randint(0, 3), rng.choice(STRENGTHS)
        rows.append(features(d, e, s))
        labels.append(int(rng.random() < model.p_success(d, e, s)))
    w = fit(rows, labels)
    assert log_loss(w, rows, labels) <= log_loss(truth, rows, labels) + 0.01  # as good as the truth
    learnt = NoisePredictor(w, cost=None)
    for d, e, s in ((0.0, 0, 0.2), (0.1, 2, 0.6), (0.2, 3, 1.0)):
        assert learnt.p_success(d, e, s) == pytest.approx(model.p_success(d, e, s), abs=0.05)


def linear_cost(strength, load):  # a final's latency and GPU-seconds grow with the steps it redoes
    return 0.2 + 1.5 * strength, 0.9 * strength


WEIGHTS = {"bias": -1.0, "embed_distance": -30.0, "word_edits": -1.5, "strength": 8.0,
           "strength*embed_distance": 20.0, "strength*word_edits": 1.5, "strength^2": -2.0}


def test_more_load_never_asks_more_of_the_cloud_and_says_what_it_costs():
    p = NoisePredictor(WEIGHTS, linear_cost)
    for distance, edits in ((0.0, 0), (0.05, 1), (0.1, 3)):
        picks = [p.choose(distance, edits, load) for load in (0.0, 0.3, 0.6, 0.9, 0.99)]
        strengths = [c.strength for c in picks]
        assert strengths == sorted(strengths, reverse=True), strengths
        # the quality given up is stated: P falls as the load rises
        ps = [c.to_plain()["p_success"] for c in picks]
        assert ps == sorted(ps, reverse=True)
    assert p.choose(0.1, 3, 0.0).strength > p.choose(0.1, 3, 0.99).strength  # and it does give some up
    assert p.choose(0.1, 3, 0.0).strength >= p.choose(0.0, 0, 0.0).strength  # a bigger change, a deeper refine
    c = p.choose(0.05, 1, 0.5)
    row = next(r for r in c.table if r["strength"] == c.strength)
    assert row["objective_s"] == pytest.approx(row["latency_s"] + row["load_term_s"] + (1 - row["p_success"]) * 10, abs=1e-3)
    assert row["load_term_s"] == pytest.approx(0.5 / 0.5 * row["cloud_gpu_s"], abs=1e-3)
    assert min(r["objective_s"] for r in c.table) == row["objective_s"]
    for bad in (-0.1, 1.5, "high"):
        with pytest.raises(PredictorError, match="load"):
            p.choose(0.0, 0, bad)
    with pytest.raises(PredictorError, match="one per feature"):
        NoisePredictor({"bias": 1.0}, linear_cost)


def test_the_shipped_predictor_and_its_card():
    shipped = json.loads(WEIGHTS_PATH.read_text())
    assert shipped["features"] == list(FEATURES) and shipped["strengths"] == list(STRENGTHS)
    curve = shipped["curve"]
    assert curve[-1]["pairs"] == shipped["pairs"] and curve[-1]["held_out_log_loss"] < shipped["constant_log_loss"]
    card = WEIGHTS_PATH.with_name("PREDICTOR_CARD.md").read_text()
    assert "train_predictor" in card and str(shipped["pairs"]) in card
    edge = StableDiffusionModel.from_pretrained(EDGE_PATH)
    p = from_profiles(20)
    for before, after in (SAME, ONE, THREE):
        calm, busy = p.choose_for(edge, before, after, 0.0), p.choose_for(edge, before, after, 0.95)
        assert busy.strength <= calm.strength  # more load, less cloud work
    assert p.choose_for(edge, *THREE).strength >= p.choose_for(edge, *SAME).strength
    assert any(p.choose_for(edge, *pair, 0.95).strength < p.choose_for(edge, *pair, 0.0).strength
               for pair in (SAME, ONE, THREE))


def test_a_session_finalizes_at_the_predictors_strength():
    edge, cloud = (StableDiffusionModel.from_pretrained(path) for path in (EDGE_PATH, CLOUD_PATH))
    predictor = NoisePredictor(WEIGHTS, linear_cost)
    session = PromptSession(edge, cloud, seed=2, predictor=predictor)
    session.preview(ONE[0])
    final = session.finalize(ONE[1], load=0.3)
    expected = predictor.choose_for(edge, ONE[0], ONE[1], 0.3)
    assert final.strength == expected.strength and final.choice == expected.to_plain()
    assert final.cloud_calls == max(1, round(expected.strength * 20))
    assert session.finalize(ONE[1], strength=0.3).choice is None  # a strength given is a strength taken


def test_predict_noise_shows_its_choice_and_why():
    r = run_cli("predict-noise", "--from", ONE[0], "--to", ONE[1], "--load", "0.5", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["strength"] in STRENGTHS and out["word_edits"] == 1 and out["load"] == 0.5
    assert [c["strength"] for c in out["candidates"]] == list(STRENGTHS)
    assert math.isclose(min(c["objective_s"] for c in out["candidates"]),
                        next(c["objective_s"] for c in out["candidates"] if c["strength"] == out["strength"]))
    bad = run_cli("predict-noise", "--from", "a", "--to", "b", "--load", "2")
    assert bad.returncode != 0 and "load" in bad.stderr and "Traceback" not in bad.stderr
