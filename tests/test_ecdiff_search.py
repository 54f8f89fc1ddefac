"""EC-Diff as published (the plan's presets) and its handoff search (pipelines/ecdiff/search.py), down to the
command line: `latentwire search` writes a plan file that eval, cost and edge run."""
import itertools
import json
from types import SimpleNamespace

import pytest
from runcli import run_cli

from latentwire.pipelines.ecdiff import SearchError, search, share
from latentwire.kernels.extrapolate import max_gap
from latentwire.pipelines.ecdiff.cache import Cache
from latentwire.pipelines.ecdiff.search import A_GRID, K_GRID, P_OFFSETS, PLACEMENTS, SCREEN_MARGIN, placed_gaps
from latentwire.scheduler import Plan, make
from latentwire.scheduler.plan import EC_DIFF_PRESETS, PlanError, ec_diff



def counts(plan):
    labels = [label for _, label in plan.labels()]
    return labels.count("cloud"), labels.count("forecast"), labels.count("edge")


def test_ec_diff_defaults_are_the_published_sd_setting():
    plan = make("ec-diff", 50)
    assert plan.params == {"p": 7, "k": 2, "a": 0.3, "s": 37} and counts(plan) == (17, 20, 13)
    assert make("ec-diff", 50, preset="sdxl").params == {"p": 6, "k": 5, "a": 0.2, "s": 36}
    assert make("ec-diff", 50, preset="cogvideox").params == {"p": 10, "k": 3, "a": 0.2, "s": 38}
    assert make("ec-diff", 20).params == {"p": 3, "k": 2, "a": 0.3, "s": 15}  # p and s scaled, k and a as published
    assert make("ec-diff", 4).params == {"p": 2, "k": 2, "a": 0.3, "s": 3}    # p >= 2, an edge step left
    assert make("ec-diff", 50, s=30, preset="sdxl").params["s"] == 30          # a given parameter wins
    with pytest.raises(PlanError, match="preset 'flux'.*sd, sdxl, cogvideox"):
        make("ec-diff", 50, preset="flux")
    assert set(EC_DIFF_PRESETS) == {"sd", "sdxl", "cogvideox"}


# -- the search, on a cost and a judge whose optimum is known ----------------------------------------------

STEP = {"cloud": 0.05, "edge": 0.2, "forecast": 0.001}


def fake_cost(plan):
    labels = [label for _, label in plan.labels()]
    latency = sum(STEP[label] for label in labels)
    return SimpleNamespace(latency_s=latency, cloud_gpu_s=labels.count("cloud") * STEP["cloud"])


def fast_edge_cost(plan):  # the edge faster than the cloud: handing off early saves time
    labels = [label for _, label in plan.labels()]
    latency = sum({"cloud": 0.05, "edge": 0.02, "forecast": 0.001}[label] for label in labels)
    return SimpleNamespace(latency_s=latency, cloud_gpu_s=labels.count("cloud") * 0.05)


def fake_judge(log):
    def judge(plan):
        log.append(plan)
        cloud, forecast, edge = counts(plan)
        # quality falls with forecast steps (more the larger a * k) and with edge steps
        fc = plan.segments[0].forecast
        loss = 0.001 * forecast * (1 + (max_gap(fc[2]) * fc[3] if fc else 0)) + 0.003 * edge
        return {"attribute_accuracy": 1.0 - loss, "frechet_distance": 100.0 * (1 + loss)}
    return judge


def test_share_is_the_lesser_of_accuracy_and_frechet_shares():
    ref = {"attribute_accuracy": 0.8, "frechet_distance": 100.0}
    assert share({"attribute_accuracy": 0.8, "frechet_distance": 100.0}, ref) == 1.0
    assert share({"attribute_accuracy": 0.4, "frechet_distance": 100.0}, ref) == 0.5
    assert share({"attribute_accuracy": 0.8, "frechet_distance": 400.0}, ref) == 0.25


@pytest.mark.parametrize("bound", [0.9, 0.95, 0.97])
def test_each_stage_returns_its_least_latency_feasible_plan(bound):
    log = []
    result = search(20, fake_cost, fake_judge(log), min_quality=bound, budget=200)
    judge = fake_judge([])
    ref = judge(make("cloud-only", 20))
    feasible = lambda p: share(judge(p), ref) >= bound  # noqa: E731
    # stage 1 by brute force over the search's grid of switch steps (p + 1 .. N - 1 in strides of about a
    # tenth), at the preset's (p, k, a) = (3, 2, 0.3) for 20 steps
    stage1 = [ec_diff(20, s=s) for s in sorted({*range(4, 20, 2), 19})]
    best1 = min((p for p in stage1 if feasible(p)), key=lambda p: fake_cost(p).latency_s)
    stage2 = [best1] + [ec_diff(20, p=max(2, 3 + dp), k=k, a=a, s=best1.params["s"])
                        for k, a, dp in itertools.product(K_GRID, A_GRID, P_OFFSETS) if a * k < 1]
    best2 = min((p for p in stage2 if feasible(p)), key=lambda p: (fake_cost(p).latency_s, fake_cost(p).cloud_gpu_s))
    assert result.plan == best2 and result.trial.share >= bound
    assert fake_cost(result.plan).latency_s <= fake_cost(best1).latency_s
    # measured in order of predicted latency within each stage, each plan once, the reference first
    for stage in (1, 2):
        lat = [t.latency_s for t in result.trials if t.stage == stage]
        assert lat == sorted(lat)
    assert log[0] == make("cloud-only", 20) and len(log) == len({p.segments for p in log}) == result.evaluations
    # far fewer measurements than candidates: the first feasible in latency order ends a stage
    assert result.evaluations < len(stage2) // 2


def test_the_budget_caps_measurements_and_an_unreachable_bound_finds_nothing():
    log = []
    result = search(20, fake_cost, fake_judge(log), min_quality=0.999, budget=5)
    assert result.plan is None and result.trial is None and result.evaluations == len(log) <= 5
    assert result.to_plain()["plan"] is None
    for bad, says in (({"min_quality": 0}, "min_quality"), ({"budget": 1}, "budget"), ({"preset": "x"}, "preset")):
        with pytest.raises((SearchError, PlanError), match=says):
            search(20, fake_cost, fake_judge([]), **bad)
    with pytest.raises(SearchError, match="num_steps"):
        search(3, fake_cost, fake_judge([]))


# -- the command line ----------------------------------------------------------------------------------

def profile(folder, name, unet):
    d = {"name": name, "model": name.split("@")[0], "hardware": name.split("@")[1], "kind": "any",
         "resolution": 32, "dtype": "float32", "latent_shape": [4, 4, 4], "unet_step_s": unet, "text_encode_s": 0.001,
         "vae_decode_s": 0.002, "fused_step_s": 0.0001,
         "sources": {k: "test fixture" for k in ("unet_step_s", "text_encode_s", "vae_decode_s", "fused_step_s")}}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(d))
    return str(path)


def run(*args):
    return run_cli(*args)


def profiles(folder):
    """(cloud, edge, link) profile paths: a fast cloud, a slower edge, a link."""
    link = folder / "link.json"
    link.write_text(json.dumps({"name": "l", "up_mbit_s": 10.0, "down_mbit_s": 50.0, "rtt_ms": 40.0,
                                "sources": {k: "test fixture" for k in ("up_mbit_s", "down_mbit_s", "rtt_ms")}}))
    return profile(folder, "big@gpu", 0.01), profile(folder, "small@phone", 0.05), link


def test_search_writes_a_plan_that_eval_and_cost_run(tmp_path):
    # the plumbing, end to end, at a size a test affords: 8 world steps with forecasting are far below
    # cloud-only (a share of about 0.03), so the bound is low; the search's own logic is tested above
    cloud, edge, link = profiles(tmp_path)
    out = tmp_path / "plan.json"
    r = run("search", "--cloud-device", cloud, "--edge-device", edge, "--link", str(link), "--steps", "8", "--n", "3",
            "--budget", "6", "--min-quality", "0.02", "--confirm-n", "4", "--threads", "1", "--out", str(out),
            "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["evaluations"] <= 6 and res["share"] >= 0.02 and res["plan"]["name"] == "ec-diff"
    assert res["confirm_n"] == 4 and res["confirmed"]["n"] == 4 and res["confirmed_share"] >= 0.02
    held = res["held_out"]
    assert held["seed"] == res["seed"] + 1 and set(held) >= {"quality", "reference", "share", "meets_bound"}
    assert held["n"] == 4  # as many as the confirmation's
    plan = Plan.from_plain(json.loads(out.read_text()))
    assert plan.to_plain() == res["plan"]
    e = run("eval", "--plan-file", str(out), "--n", "3", "--threads", "1", "--json")
    assert e.returncode == 0, e.stderr[-2000:]
    # the same plan on the same prompts and seeds as the search's measurement of it
    measured = [t for t in res["trials"] if t["plan"] == res["plan_text"]][0]["quality"]
    assert json.loads(e.stdout)["attribute_accuracy"] == measured["attribute_accuracy"]
    c = run("cost", "--plan-file", str(out), "--cloud-device", cloud, "--edge-device", edge, "--link", str(link),
            "--json")
    assert c.returncode == 0 and json.loads(c.stdout)["latency_s"] == pytest.approx(res["latency_s"]), c.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**res["plan"], "segments": [["cloud", 0, 3, [], False]]}))
    e = run("cost", "--plan-file", str(bad), "--cloud-device", cloud, "--edge-device", edge, "--link", str(link))
    assert e.returncode != 0 and "--plan-file" in e.stderr and "ends at step 3" in e.stderr
    assert "Traceback" not in e.stderr


def test_beyond_ec_diff_stage_two_also_tries_taylor_forecasters():
    base = fake_judge([])

    def judge(plan):  # Taylor forecasts as well as real calls would; EC-Diff's rule only at its own k = 2
        fc = plan.segments[0].forecast
        if fc and fc[0] == "taylor":
            return base(make("cloud-only", 20))
        bad = fc and fc[2] != 2
        return {"attribute_accuracy": 0.5, "frechet_distance": 1e4} if bad else base(plan)

    ecdiff_only = search(20, fake_cost, judge, min_quality=0.95, budget=400)
    both = search(20, fake_cost, judge, min_quality=0.95, budget=400, forecasters=("ecdiff", "taylor"))
    assert both.plan.name == "ec-diff-taylor" and both.trial.share == 1.0
    # the least-latency Taylor plan at stage 1's s: the largest k, as few real calls as the order allows
    assert both.plan.segments[0].forecast[1:3] == (1, max(K_GRID))
    # a wider grid can only find a plan as fast or faster, never a slower one
    assert (both.trial.latency_s, both.trial.cloud_gpu_s) <= (ecdiff_only.trial.latency_s, ecdiff_only.trial.cloud_gpu_s)
    taylor = [t for t in both.trials if t.plan.name == "ec-diff-taylor"]
    for t in taylor:
        kind, order, k, variable = t.plan.segments[0].forecast
        assert kind == "taylor" and order in (1, 2, 3) and variable in ("t", "sigma")
        assert Plan.from_plain(t.plan.to_plain()) == t.plan  # an ordinary plan, a plan file like any other
    with pytest.raises(SearchError, match="forecasters"):
        search(20, fake_cost, fake_judge([]), forecasters=("ecdiff", "magic"))


def test_a_candidate_must_also_pass_on_the_confirmation_prompts():
    base = fake_judge([])
    confirmed = []

    plain = search(20, fast_edge_cost, base, min_quality=0.95, budget=400)
    limit = counts(plain.plan)[1]

    def confirm(plan):  # on more prompts, as many forecast steps as the plain search's pick fall below the bound
        confirmed.append(plan)
        q = dict(base(plan))
        if counts(plan)[1] >= limit:
            q["frechet_distance"] *= 1.2
        return q

    checked = search(20, fast_edge_cost, base, min_quality=0.95, budget=400, confirm=confirm)
    assert counts(checked.plan)[1] < limit and checked.plan.name == "ec-diff"  # the plain pick fails confirmation
    assert checked.trial.confirmed_share >= 0.95 and checked.trial.share >= 0.95
    refused = [t for t in checked.trials if t.confirmed is not None and t.confirmed_share < 0.95]
    assert refused and all(t.share >= 0.95 for t in refused)
    # cloud-only is confirmed once, each candidate once, and every confirmation counts against the budget
    assert confirmed.count(make("cloud-only", 20)) == 1 and len(confirmed) == len({p.segments for p in confirmed})
    measured = len({t.plan.segments for t in checked.trials}) + 1
    assert checked.evaluations == measured + len(confirmed)
    assert checked.to_plain()["confirmed_share"] == checked.trial.confirmed_share


def test_stage_one_falls_back_to_no_forecasting_when_the_preset_forecasts_too_much():
    base = fake_judge([])

    def judge(plan):  # any forecast step costs more than the bound allows
        return {"attribute_accuracy": 0.5, "frechet_distance": 1e4} if counts(plan)[1] else base(plan)

    result = search(20, fast_edge_cost, judge, min_quality=0.95, budget=400)
    assert result.plan is not None and counts(result.plan)[1] == 0 and result.plan.params["k"] == 0
    assert [t.plan.params["k"] for t in result.trials if t.stage == 1][-1] == 0
    # the earliest switch step that keeps the bound without forecasting (the edge is the faster side here)
    feasible = [s for s in sorted({*range(4, 20, 2), 19})
                if share(base(ec_diff(20, k=0, s=s)), base(make("cloud-only", 20))) >= 0.95]
    assert result.plan.params["s"] == min(feasible)


def test_a_split_slower_than_cloud_only_gives_way_to_cloud_only():
    def judge(plan):  # no forecast and no edge step passes but the last
        cloud, forecast, edge = counts(plan)
        bad = forecast or edge > 1
        return {"attribute_accuracy": 0.5 if bad else 1.0, "frechet_distance": 1e4 if bad else 100.0}

    def slow_edge(plan):  # an edge step and the handoff cost more than the cloud step they replace
        c = fake_cost(plan)
        return SimpleNamespace(latency_s=c.latency_s + (0.5 if counts(plan)[2] else 0), cloud_gpu_s=c.cloud_gpu_s)

    result = search(20, slow_edge, judge, min_quality=0.95, budget=400)
    assert result.plan == make("cloud-only", 20) and result.trial.share == 1.0 and result.trial.stage == 0
    assert any(t.plan.params.get("k") == 0 and t.share >= 0.95 for t in result.trials)  # found, and slower


# -- beyond EC-Diff: where the cloud's calls fall, no handoff, a cheap proxy, a cache ---------------------

@pytest.mark.parametrize("power", sorted(PLACEMENTS.values()))
@pytest.mark.parametrize("forecasts", [1, 4, 9])
def test_placed_gaps_put_that_many_forecasts_after_the_warmup(power, forecasts):
    gaps = placed_gaps(3, 15, forecasts, power)
    plan = ec_diff(20, p=3, k=gaps, a=0.1, s=15)
    labels = [label for _, label in plan.labels()][:15]
    assert labels[:3] == ["cloud"] * 3 and labels.count("forecast") == forecasts
    assert placed_gaps(3, 15, 12, power) is None and placed_gaps(3, 15, 0, power) is None  # no real call left


def test_early_and_late_placements_put_the_forecasts_early_and_late():
    where = {name: [i for i, label in ec_diff(20, p=3, k=placed_gaps(3, 15, 4, power), a=0.1, s=15).labels()
                    if label == "forecast"] for name, power in PLACEMENTS.items()}
    assert sum(where["early"]) < sum(where["even"]) < sum(where["late"])


def test_stage_three_finds_fewer_calls_placed_where_they_matter():
    base = fake_judge([])

    def judge(plan):  # a forecast before step 8 costs nothing, after it any is too many; so are 9 edge steps
        late = [i for i, label in plan.labels() if label == "forecast" and i >= 8]
        bad = late or counts(plan)[2] > 8
        return {"attribute_accuracy": 0.5, "frechet_distance": 1e4} if bad else base(plan)

    # every fixed cycle forecasts to the handoff, so EC-Diff's search finds no forecasting that passes
    fixed = search(20, fast_edge_cost, judge, min_quality=0.95, budget=400)
    assert counts(fixed.plan)[1] == 0
    placed = search(20, fast_edge_cost, judge, min_quality=0.95, budget=400, spacing=True)
    assert (placed.trial.latency_s, placed.trial.cloud_gpu_s) < (fixed.trial.latency_s, fixed.trial.cloud_gpu_s)
    assert placed.trial.stage == 3 and type(placed.plan.segments[0].forecast[2]) is tuple
    assert counts(placed.plan)[1] > counts(fixed.plan)[1]  # more forecast steps, all early
    assert all(i < 8 for i, label in placed.plan.labels() if label == "forecast")
    assert Plan.from_plain(json.loads(json.dumps(placed.plan.to_plain()))) == placed.plan  # a plan file


def test_the_proxy_orders_equal_latency_candidates_and_costs_no_measurement():
    base = fake_judge([])
    ranked = []

    def rank(plan):  # a proxy that knows: forecasts before step 8 (the judge's failures), then the later the better
        ranked.append(plan)
        where = [i for i, label in plan.labels() if label == "forecast"]
        return sum(i < 8 for i in where) - 0.001 * sum(where)

    def judge(plan):  # and it is: a forecast before step 8 fails, and so do 9 edge steps
        early = [i for i, label in plan.labels() if label == "forecast" and i < 8]
        bad = early or counts(plan)[2] > 8
        return {"attribute_accuracy": 0.5, "frechet_distance": 1e4} if bad else base(plan)

    plain = search(20, fast_edge_cost, judge, min_quality=0.95, budget=400, spacing=True)
    guided = search(20, fast_edge_cost, judge, min_quality=0.95, budget=400, spacing=True, rank=rank)
    assert guided.plan == plain.plan and guided.trial.stage == 3
    assert guided.evaluations < plain.evaluations and ranked  # the proxy put the passing placement first
    assert len(ranked) == len({p.segments for p in ranked})   # each candidate ranked once


def test_without_a_handoff_the_cloud_may_forecast_to_the_end():
    def slow_edge(plan):  # as on the published profiles: an edge step costs more than a cloud step
        c = fake_cost(plan)
        return SimpleNamespace(latency_s=c.latency_s + (0.5 if counts(plan)[2] else 0), cloud_gpu_s=c.cloud_gpu_s)

    base = fake_judge([])
    result = search(20, slow_edge, base, min_quality=0.95, budget=400, handoff_optional=True)
    assert result.plan.name == "cloud-forecast" and result.plan.params["s"] == 20 and counts(result.plan)[2] == 0
    assert counts(result.plan)[1] > 0 and result.trial.latency_s < slow_edge(make("cloud-only", 20)).latency_s
    assert Plan.from_plain(result.plan.to_plain()) == result.plan
    assert search(20, slow_edge, base, min_quality=0.95, budget=400).plan.name != "cloud-forecast"


def test_the_cache_answers_what_it_measured_and_survives_a_restart(tmp_path):
    path = str(tmp_path / "cache.json")
    calls = []
    cache = Cache(path)
    plan = make("ec-diff", 20)
    first = cache.measure("quality", plan, lambda: calls.append(1) or {"attribute_accuracy": 0.9}, n=8, seed=1)
    again = Cache(path).measure("quality", plan, lambda: calls.append(1) or {}, n=8, seed=1)
    assert first == again == {"attribute_accuracy": 0.9} and len(calls) == 1
    Cache(path).measure("quality", plan, lambda: calls.append(1) or {}, n=9, seed=1)  # another key: measured
    Cache(path).measure("quality", make("ec-diff", 20, s=12), lambda: calls.append(1) or {}, n=8, seed=1)
    assert len(calls) == 3
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a measurement cache"):
        Cache(str(tmp_path / "bad.json"))


def test_a_second_search_over_the_same_candidates_measures_nothing_new(tmp_path):
    cloud, edge, link = profiles(tmp_path)
    cache = tmp_path / "cache.json"
    args = ["search", "--cloud-device", cloud, "--edge-device", edge, "--link", str(link), "--steps", "8", "--n", "2",
            "--budget", "4", "--min-quality", "0.01", "--confirm-n", "0", "--threads", "1", "--rank-n", "1",
            "--spacing", "--no-handoff", "--forecasters", "ecdiff,taylor", "--cache", str(cache), "--json"]
    first = run(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["cache_hits"] == 0 and b["cache_hits"] >= a["evaluations"] + 2  # + the held-out pair
    assert {k: v for k, v in a.items() if k != "cache_hits"} == {k: v for k, v in b.items() if k != "cache_hits"}
    assert a["spacing"] and a["no_handoff"] and a["rank_n"] == 1


def test_a_candidate_much_farther_than_a_failure_at_its_switch_step_is_screened_unmeasured():
    base = fake_judge([])

    def judge(plan):  # forecasting with EC-Diff's rule fails beyond k = 1
        fc = plan.segments[0].forecast
        return {"attribute_accuracy": 0.5, "frechet_distance": 1e4} if fc and max_gap(fc[2]) > 1 else base(plan)

    def rank(plan):  # the proxy grows with the longest run of forecasts, as the quality loss does
        fc = plan.segments[0].forecast
        return max_gap(fc[2]) * (1 + fc[3]) if fc and fc[0] == "ecdiff" else 0.0

    plain = search(20, fake_cost, judge, min_quality=0.95, budget=400)
    screened = search(20, fake_cost, judge, min_quality=0.95, budget=400, rank=rank)
    assert screened.plan == plain.plan and screened.evaluations < plain.evaluations
    skipped = [t for t in screened.trials if t.screened]
    assert skipped and all(t.quality is None and t.share is None and t.proxy is not None for t in skipped)
    for t in skipped:  # each was at least SCREEN_MARGIN times as far as a measured failure at its switch step
        assert any(f.share is not None and f.share < 0.95 and f.plan.params["s"] == t.plan.params["s"]
                   and SCREEN_MARGIN * f.proxy <= t.proxy for f in screened.trials)
    assert all(t["screened"] in (True, False) for t in screened.to_plain()["trials"])
    off = search(20, fake_cost, judge, min_quality=0.95, budget=400, rank=rank, screen_margin=0)
    assert off.plan == plain.plan and not any(t.screened for t in off.trials)  # the proxy then only orders ties
