"""The cost model: profiles checked at every edge, predict's arithmetic for every built-in plan against sums
written out here and message sizes from wire built independently, the measured profile, the CLI."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from runcli import run_cli

from latentwire.protocol import wire_bytes
from latentwire.scheduler import wire
from latentwire.scheduler.cost import model as cost_model
from latentwire.scheduler.cost import profiles
from latentwire.scheduler.cost.model import NOISE_SEED, TYPICAL_PID, CostError, default_session, md1_wait, predict
from latentwire.scheduler.cost.profiles import (MAX_BATCH, MAX_LATENT_DIM, MAX_MBIT_S, MAX_RESOLUTION, MAX_RTT_MS,
                                                MAX_SECONDS, ProfileError, device_from_plain, link_from_plain,
                                                assume, list_profiles, load_device, load_link)
from latentwire.scheduler.plan import make
from latentwire.scheduler.serving.link import Link, parse_link

FIGURES = ("unet_step_s", "text_encode_s", "vae_decode_s", "fused_step_s")
FP16 = wire.Codecs(latent=("fp16", 0), state=("fp16", 0), preview=("fp16", 0))  # sizes independent of values


def device(name="big@gpu", unet=0.05, text=0.011, decode=0.13, fused=0.002, batch=None, shape=(4, 64, 64), **extra):
    d = {"name": name, "model": name.split("@")[0], "hardware": name.split("@")[1], "kind": "any",
         "resolution": 512, "dtype": "float16", "latent_shape": list(shape), "unet_step_s": unet,
         "text_encode_s": text, "vae_decode_s": decode, "fused_step_s": fused,
         "sources": {k: "test fixture" for k in FIGURES}}
    if batch is not None:
        d["unet_step_s_batch"] = batch
        d["sources"]["unet_step_s_batch"] = "test fixture"
    d.update(extra)
    return d


def link(name="testlink", up=10.0, down=50.0, rtt=40.0, **extra):
    return {"name": name, "up_mbit_s": up, "down_mbit_s": down, "rtt_ms": rtt,
            "sources": {k: "test fixture" for k in ("up_mbit_s", "down_mbit_s", "rtt_ms")}, **extra}


def write(tmp_path, d, name=None):
    path = tmp_path / f"{name or d['name']}.json"
    path.write_text(json.dumps(d))
    return str(path)


@pytest.fixture
def trio(tmp_path):
    """(cloud, edge, link) loaded from files in tmp_path."""
    cloud = load_device(write(tmp_path, device("big@gpu", batch={"1": 0.05, "4": 0.12})))
    edge = load_device(write(tmp_path, device("small@phone", unet=0.5, text=0.02, decode=0.8, fused=0.003)))
    return cloud, edge, load_link(write(tmp_path, link()))


# -- profiles ---------------------------------------------------------------------------------------------

def test_a_device_profile_loads_from_its_file(tmp_path):
    p = load_device(write(tmp_path, device(batch={"1": 0.05, "16": 0.3})))
    assert (p.name, p.model, p.hardware, p.kind, p.resolution, p.dtype) == ("big@gpu", "big", "gpu", "any", 512,
                                                                            "float16")
    assert p.latent_shape == (4, 64, 64) and p.unet_step_s == 0.05 and p.unet_step_s_batch == {1: 0.05, 16: 0.3}
    assert p.fused_step_s == 0.002 and p.missing == () and p.sources["unet_step_s"] == "test fixture"
    assert isinstance(ProfileError("f", "x", "bad"), ValueError)


def _refused(d, field, loader=device_from_plain):
    with pytest.raises(ProfileError) as e:
        loader(d, "fixture.json")
    assert "fixture.json" in str(e.value) and repr(field) in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.parametrize("field,ok,bad", [
    ("unet_step_s", [1e-9, MAX_SECONDS], [0, -1e-9, MAX_SECONDS * 1.0001, "0.1", True, math.inf]),
    ("text_encode_s", [1e-9, MAX_SECONDS], [0.0, MAX_SECONDS + 1]),
    ("vae_decode_s", [1e-9, MAX_SECONDS], [0, MAX_SECONDS + 1]),
    ("fused_step_s", [0, 0.0, MAX_SECONDS], [-1e-9, MAX_SECONDS + 1]),
    ("resolution", [1, MAX_RESOLUTION], [0, MAX_RESOLUTION + 1, 512.0, None]),
    ("latent_shape", [[1, 1, 1], [4, 64, 64], [13, 16, 60, 90], [4, MAX_LATENT_DIM, 1]],
     [[4, 64], [1, 4, 4, 64, 64], [0, 64, 64], [4, MAX_LATENT_DIM + 1, 1], [4, 64.0, 64], "4x64x64", None]),
    ("kind", ["cloud", "edge", "any"], ["server", "", None]),
    ("dtype", ["float32", "float16", "bfloat16", "int8"], ["fp16", "", None]),
    ("model", ["m", "x" * 64], ["", "x" * 65, None, 3]),
])
def test_each_device_field_is_checked_at_its_edge(field, ok, bad):
    for v in ok:
        assert getattr(device_from_plain(device(**{field: v})), field) == (tuple(v) if isinstance(v, list) else v)
    for v in bad:
        _refused(device(**{field: v}), field)


def test_device_names_and_unknown_or_absent_fields():
    assert device_from_plain(device(name="a" * 31 + "@" + "b" * 32)).name.endswith("b")
    _refused(device(name="a" * 32 + "@" + "b" * 32), "name")  # 65 characters
    _refused(device(name="sd 1.5@gpu"), "name")
    _refused(device(notes_typo="x"), "notes_typo")
    d = device()
    del d["vae_decode_s"]
    assert "add it (null" in _refused(d, "vae_decode_s")
    d = device()
    del d["sources"]
    _refused(d, "sources")
    d = device()
    del d["fused_step_s"]
    d["sources"].pop("fused_step_s")
    assert device_from_plain(d).fused_step_s == 0.0  # optional: absent is the format's default


def test_null_is_allowed_only_when_listed_in_missing():
    d = device(text_encode_s=None)
    assert "not listed" in _refused(d, "text_encode_s")
    d["missing"] = ["text_encode_s"]
    d["sources"].pop("text_encode_s")
    p = device_from_plain(d, "fixture.json")
    assert p.text_encode_s is None and p.missing == ("text_encode_s",)
    with pytest.raises(ProfileError, match=r"'big@gpu'.*'text_encode_s'.*latentwire profile"):
        p.need("text_encode_s")
    assert "has a figure" in _refused(device(missing=["unet_step_s"]), "missing")
    assert "not a figure" in _refused(device(missing=["resolution"]), "missing")
    _refused(device(missing="unet_step_s"), "missing")
    d = device(unet_step_s_batch=None)
    _refused(d, "unet_step_s_batch")
    d["missing"] = ["unet_step_s_batch"]
    assert device_from_plain(d).unet_step_s_batch is None


def test_every_figure_cites_its_source():
    d = device()
    d["sources"].pop("unet_step_s")
    assert "no source" in _refused(d, "sources.unet_step_s")
    d = device()
    d["sources"]["resolution"] = "a paper"
    _refused(d, "sources.resolution")
    d = device()
    d["sources"]["unet_step_s"] = "  "
    _refused(d, "sources.unet_step_s")
    _refused(device(derived={"unet_step_s": 3}), "derived.unet_step_s")
    assert device_from_plain(device(derived={"unet_step_s": "50 steps in 2.5 s / 50"})).derived


@pytest.mark.parametrize("table,field", [({"0": 0.1}, "unet_step_s_batch.0"), ({"01": 0.1}, "unet_step_s_batch.01"),
                                         ({str(MAX_BATCH + 1): 0.1}, f"unet_step_s_batch.{MAX_BATCH + 1}"),
                                         ({"4": 0}, "unet_step_s_batch.4"), ({"4": "0.1"}, "unet_step_s_batch.4"),
                                         ({}, "unet_step_s_batch"), ([0.1], "unet_step_s_batch")])
def test_the_batch_table_is_checked(table, field):
    _refused(device(batch=table), field)


def test_the_batch_table_at_its_edges():
    p = device_from_plain(device(batch={"1": 0.05, str(MAX_BATCH): MAX_SECONDS}))
    assert p.unet_step_s_batch == {1: 0.05, MAX_BATCH: MAX_SECONDS}


@pytest.mark.parametrize("field,ok,bad", [
    ("up_mbit_s", [1e-9, MAX_MBIT_S], [0, -1, MAX_MBIT_S * 1.0001, "10"]),
    ("down_mbit_s", [1e-9, MAX_MBIT_S], [0, MAX_MBIT_S * 1.0001]),
    ("rtt_ms", [0, MAX_RTT_MS], [-1e-9, MAX_RTT_MS + 1, math.nan]),
])
def test_each_link_field_is_checked_at_its_edge(field, ok, bad):
    for v in ok:
        d = link()
        d[field] = v
        assert getattr(link_from_plain(d), field) == v
    for v in bad:
        d = link()
        d[field] = v
        _refused(d, field, link_from_plain)
    d = link()
    d[field] = None
    _refused(d, field, link_from_plain)
    d["missing"] = [field]
    d["sources"].pop(field)
    with pytest.raises(ProfileError, match=field):
        link_from_plain(d).need(field)


def test_files_names_and_paths(tmp_path, monkeypatch):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="broken.json.*not valid JSON"):
        load_device(str(bad))
    bad.write_text('{"unet_step_s": NaN}')
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_device(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ProfileError, match="JSON object"):
        load_device(str(bad))
    with pytest.raises(ProfileError, match="no such file"):
        load_device(str(tmp_path / "absent.json"))
    # names come from the package data folder; monkeypatched to one made here
    (tmp_path / "devices").mkdir()
    (tmp_path / "links").mkdir()
    monkeypatch.setattr(profiles, "DATA", str(tmp_path))
    write(tmp_path / "devices", device("big@gpu"))
    write(tmp_path / "devices", device("other@gpu"), name="renamed@gpu")
    write(tmp_path / "links", link("lan"))
    assert list_profiles() == {"devices": ["big@gpu", "renamed@gpu"], "links": ["lan"]}
    assert load_device("big@gpu").name == "big@gpu" and load_link("lan").rtt_ms == 40.0
    with pytest.raises(ProfileError, match="differs from the file's name"):
        load_device("renamed@gpu")
    with pytest.raises(ProfileError, match=r"no device profile.*big@gpu, renamed@gpu"):
        load_device("nope@gpu")
    with pytest.raises(ProfileError, match="no link profile"):
        load_link("big@gpu")


@pytest.mark.parametrize("kind,name", [("devices", n) for n in list_profiles()["devices"]]
                         + [("links", n) for n in list_profiles()["links"]])
def test_every_shipped_profile_loads(kind, name):
    p = (load_device if kind == "devices" else load_link)(name)
    assert p.name == name and p.sources


# -- the model --------------------------------------------------------------------------------------------

def _noise(shape):
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(NOISE_SEED))


def _run_bytes(plan, a, b, codecs, latent=None, state=None, session=None):
    session = session or default_session(plan)
    return wire_bytes(wire.Run(session=session, segments=(a, b), session_id="0" * 32, deadline_s=118.0,
                               codecs=codecs, latent_space=[4, 8, 0.18215], text_space=[768, 77, 49408],
                               latent=latent, state=state).to_frames())


def _handoff_bytes(plan, stop, calls, forecasts, codecs, latent, state=None, session=None):
    session = session or default_session(plan)
    ts = session.make_scheduler().timesteps
    timestep = float(ts[stop]) if stop < len(ts) else -1.0
    return wire_bytes(wire.Handoff(latent, stop, timestep, 0, state, calls, forecasts, TYPICAL_PID).to_frames(codecs))


def _preview_bytes(step, codecs, shape=(4, 64, 64)):
    return wire_bytes(wire.Preview(step, TYPICAL_PID, _noise(shape)).to_frames(codecs))


def _check_parts(cost):
    assert set(cost.parts) == set(cost_model.PARTS)
    assert cost.latency_s == pytest.approx(sum(cost.parts.values()), rel=1e-12)


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_cloud_only(trio, steps):
    cloud, edge, lk = trio
    plan = make("cloud-only", steps)
    cost = predict(plan, cloud, edge, lk)
    _check_parts(cost)
    cloud_time = steps * (cloud.unet_step_s + cloud.fused_step_s) + cloud.text_encode_s
    assert cost.cloud_gpu_s == pytest.approx(cloud_time, rel=1e-12)
    up = _run_bytes(plan, 0, 1, wire.Codecs())  # x_T is the cloud's own: no latent goes up
    down = _handoff_bytes(plan, steps, steps, 0, wire.Codecs(), _noise((4, 64, 64)))
    assert (cost.bytes_up, cost.bytes_down, cost.requests, cost.previews) == (up, down, 1, 0)
    expected = (cloud_time + 8 * up / 10e6 + 0.040 + 8 * down / 50e6 + edge.vae_decode_s)
    assert cost.latency_s == pytest.approx(expected, rel=1e-12)
    assert cost.edge_s == pytest.approx(edge.vae_decode_s) and cost.parts["queue"] == 0.0
    assert cost.parts["text_encode"] == cloud.text_encode_s  # the edge runs no step: it encodes nothing


def test_edge_only_sends_nothing(trio, tmp_path):
    cloud, edge, lk = trio
    nothing = load_device(write(tmp_path, device("void@gpu", unet=None, text=None, decode=None,
                                                 missing=["unet_step_s", "text_encode_s", "vae_decode_s"])))
    for c in (cloud, nothing):  # the cloud's profile is not read
        cost = predict(make("edge-only", 20), c, edge, lk, load=0.9, preview_every=1)
        _check_parts(cost)
        assert (cost.bytes_up, cost.bytes_down, cost.requests, cost.cloud_gpu_s) == (0, 0, 0, 0.0)
        assert cost.latency_s == pytest.approx(edge.text_encode_s + 20 * (edge.unet_step_s + edge.fused_step_s)
                                               + edge.vae_decode_s, rel=1e-12)
        assert cost.edge_s == pytest.approx(cost.latency_s, rel=1e-12)


@pytest.mark.parametrize("codecs", [None, FP16])
def test_hybrid_sd_bytes_are_the_real_frames(trio, codecs):
    cloud, edge, lk = trio
    plan = make("hybrid-sd", 25, k=10)
    cost = predict(plan, cloud, edge, lk, codecs=codecs)
    _check_parts(cost)
    c = codecs or wire.Codecs()
    assert cost.bytes_up == _run_bytes(plan, 0, 1, c)
    assert cost.bytes_down == _handoff_bytes(plan, 10, 10, 0, c, _noise((4, 64, 64)))
    assert cost.cloud_gpu_s == pytest.approx(cloud.text_encode_s + 10 * (cloud.unet_step_s + cloud.fused_step_s))
    assert cost.parts["edge_steps"] == pytest.approx(15 * (edge.unet_step_s + edge.fused_step_s), rel=1e-12)
    assert cost.parts["text_encode"] == pytest.approx(cloud.text_encode_s + edge.text_encode_s, rel=1e-12)
    assert cost.edge_s == pytest.approx(edge.text_encode_s + cost.parts["edge_steps"] + edge.vae_decode_s)


def test_a_multistep_solver_sends_its_state_back(trio):
    cloud, edge, lk = trio
    plan = make("hybrid-sd", 25, k=10)
    session = default_session(plan, "DPMSolverMultistepScheduler")
    cost = predict(plan, cloud, edge, lk, codecs=FP16, session=session)
    from latentwire.kernels.sampler import SolverState

    x = _noise((4, 64, 64))
    with_state = _handoff_bytes(plan, 10, 10, 0, FP16, x, SolverState(x0_prev=x), session=session)
    assert cost.bytes_down == with_state > _handoff_bytes(plan, 10, 10, 0, FP16, x, session=session)
    restarted = default_session(plan, "DPMSolverMultistepScheduler")
    restarted = type(restarted)(**{**restarted.__dict__, "restart_solver": True})
    assert predict(plan, cloud, edge, lk, codecs=FP16, session=restarted).bytes_down == \
        _handoff_bytes(plan, 10, 10, 0, FP16, x, session=restarted)


def test_ec_diff_counts_forecast_steps(trio):
    cloud, edge, lk = trio
    plan = make("ec-diff", 50, p=7, k=2, a=0.3, s=37)
    labels = [side for _, side in plan.labels()]
    real, forecast = labels.count("cloud"), labels.count("forecast")
    assert real + forecast == 37 and forecast > 0
    cost = predict(plan, cloud, edge, lk, codecs=FP16)
    _check_parts(cost)
    assert cost.parts["cloud_steps"] == pytest.approx(real * (cloud.unet_step_s + cloud.fused_step_s), rel=1e-12)
    assert cost.parts["forecast_steps"] == pytest.approx(forecast * cloud.fused_step_s, rel=1e-12)
    assert cost.cloud_gpu_s == pytest.approx(cloud.text_encode_s + real * (cloud.unet_step_s + cloud.fused_step_s)
                                             + forecast * cloud.fused_step_s, rel=1e-12)
    assert cost.bytes_down == _handoff_bytes(plan, 37, real, forecast, FP16, _noise((4, 64, 64)))


def test_preview_refine_sends_the_preview_up(trio):
    cloud, edge, lk = trio
    plan = make("preview-refine", 20, strength=0.3)  # the cloud redoes steps 14..19
    cost = predict(plan, cloud, edge, lk, codecs=FP16)
    _check_parts(cost)
    x = _noise((4, 64, 64))
    assert cost.bytes_up == _run_bytes(plan, 1, 2, FP16, latent=x)
    assert cost.bytes_down == _handoff_bytes(plan, 20, 6, 0, FP16, x)  # the end of the plan: no state back
    assert cost.parts["edge_steps"] == pytest.approx(20 * (edge.unet_step_s + edge.fused_step_s), rel=1e-12)
    assert cost.parts["cloud_steps"] == pytest.approx(6 * (cloud.unet_step_s + cloud.fused_step_s), rel=1e-12)


def test_previews_share_the_downlink_first_in_first_out(tmp_path):
    shape = (4, 8, 8)
    cloud = load_device(write(tmp_path, device("c@x", unet=1.0, fused=0.0, shape=shape)))
    edge = load_device(write(tmp_path, device("e@x", shape=shape)))
    slow = load_link(write(tmp_path, link("slow", down=1e-3)))  # 1 kbit/s: a preview takes seconds
    plan = make("cloud-only", 6)
    h = _handoff_bytes(plan, 6, 6, 0, FP16, _noise(shape))
    p = _preview_bytes(5, FP16, shape)
    # one preview, after the last step: it goes first, then the handoff
    cost = predict(plan, cloud, edge, slow, codecs=FP16, preview_every=6)
    assert (cost.previews, cost.bytes_down) == (1, p + h)
    assert cost.parts["transfer_down"] == pytest.approx(8 * (p + h) / 1e3, rel=1e-12)
    # a preview after every 1 s step, each taking 8 p / 1e3 s > 1 s: they queue; the handoff leaves after all
    t_p = 8 * p / 1e3
    assert t_p > 1.0
    cost = predict(plan, cloud, edge, slow, codecs=FP16, preview_every=1)
    text = cloud.text_encode_s
    free = 0.0
    for i in range(6):
        free = max(text + (i + 1) * 1.0, free) + t_p
    assert cost.previews == 6 and cost.bytes_down == h + sum(_preview_bytes(i, FP16, shape) for i in range(6))
    assert cost.parts["transfer_down"] == pytest.approx(free - (text + 6.0) + 8 * h / 1e3, rel=1e-12)
    fast = load_link(write(tmp_path, link("fast", down=1e3)))  # each preview is gone before the next step
    cost = predict(plan, cloud, edge, fast, codecs=FP16, preview_every=1)
    assert cost.parts["transfer_down"] == pytest.approx(8 * (p + h) / 1e9, rel=1e-9)


def test_the_queue_is_m_d_1(trio):
    cloud, edge, lk = trio
    assert md1_wait(0.0, 3.0) == 0.0 and md1_wait(0.5, 3.0) == pytest.approx(1.5)
    assert md1_wait(0.9, 2.0) == pytest.approx(0.9 * 2.0 / (2 * 0.1))
    assert md1_wait(0.999, 1.0) == pytest.approx(499.5)
    for bad in (1.0, 1, -0.01, math.nan, "0.5", None):
        with pytest.raises(CostError, match="load"):
            md1_wait(bad, 1.0)
    plan = make("hybrid-sd", 25, k=10)
    service = cloud.text_encode_s + 10 * (cloud.unet_step_s + cloud.fused_step_s)
    base = predict(plan, cloud, edge, lk, codecs=FP16)
    assert base.parts["queue"] == 0.0
    for rho in (0.25, 0.5, 0.9):
        c = predict(plan, cloud, edge, lk, codecs=FP16, load=rho)
        assert c.parts["queue"] == pytest.approx(rho * service / (2 * (1 - rho)), rel=1e-12)
        assert c.latency_s - base.latency_s == pytest.approx(c.parts["queue"], rel=1e-9)
        assert c.cloud_gpu_s == base.cloud_gpu_s  # waiting uses no GPU
    with pytest.raises(CostError, match="load"):
        predict(plan, cloud, edge, lk, load=1.0)


def test_cloud_batching(trio, tmp_path):
    cloud, edge, lk = trio
    plan = make("cloud-only", 10)
    one = predict(plan, cloud, edge, lk, codecs=FP16)
    four = predict(plan, cloud, edge, lk, codecs=FP16, cloud_batch=4)
    f = cloud.fused_step_s
    assert four.cloud_gpu_s == pytest.approx(cloud.text_encode_s + 10 * (0.12 / 4 + f), rel=1e-12)
    assert four.parts["cloud_steps"] == pytest.approx(10 * (0.12 + f), rel=1e-12)  # a session waits for the batch
    assert four.cloud_gpu_s < one.cloud_gpu_s and four.latency_s > one.latency_s
    with pytest.raises(CostError, match=r"cloud_batch 2.*\[1, 4\]"):
        predict(plan, cloud, edge, lk, cloud_batch=2)
    for bad in (0, 1.0, -1):
        with pytest.raises(CostError, match="cloud_batch"):
            predict(plan, cloud, edge, lk, cloud_batch=bad)
    with pytest.raises(ProfileError, match=r"'small@phone'.*unet_step_s_batch"):
        predict(plan, edge, edge, lk, cloud_batch=4)


def test_a_null_figure_the_plan_needs_is_an_error(trio, tmp_path):
    cloud, edge, lk = trio
    d = device("nodecode@phone", decode=None, missing=["vae_decode_s"])
    d["sources"].pop("vae_decode_s")
    nodecode = load_device(write(tmp_path, d))
    with pytest.raises(ProfileError, match=r"'nodecode@phone'.*'vae_decode_s'.*latentwire profile"):
        predict(make("cloud-only", 5), cloud, nodecode, lk)
    d = device("nofused@gpu", fused=None, missing=["fused_step_s"])
    d["sources"].pop("fused_step_s")
    cost = predict(make("cloud-only", 5), load_device(write(tmp_path, d)), edge, lk)  # optional: taken as 0
    assert any("fused_step_s" in n for n in cost.notes)


def test_arguments_are_checked(trio, tmp_path):
    cloud, edge, lk = trio
    plan = make("hybrid-sd", 10)
    other = load_device(write(tmp_path, device("xl@gpu", shape=(4, 128, 128))))
    with pytest.raises(CostError, match="latent_shape"):
        predict(plan, other, edge, lk)
    small = predict(plan, other, edge, lk, latent_shape=(4, 8, 8), codecs=FP16)
    assert small.bytes_down == _handoff_bytes(plan, 4, 4, 0, FP16, _noise((4, 8, 8)))
    assert predict(make("edge-only", 10), other, edge, lk).bytes_up == 0  # the cloud's shape is not used
    with pytest.raises(CostError, match="preview_every"):
        predict(plan, cloud, edge, lk, preview_every=-1)
    with pytest.raises(CostError, match="session"):
        predict(plan, cloud, edge, lk, session=default_session(make("hybrid-sd", 10, k=3)))
    with pytest.raises(CostError, match="DeviceProfile"):
        predict(plan, {"name": "x"}, edge, lk)
    with pytest.raises(CostError, match="LinkProfile"):
        predict(plan, cloud, edge, Link("x", 1, 1))
    with pytest.raises(CostError, match="scheduler"):
        default_session(plan, "NoSuchScheduler")


def test_a_measured_profile_loads_and_predicts(tmp_path):
    from latentwire.pipelines.models import load_model
    from latentwire.pipelines.models.tiny import save_tiny_pair
    from latentwire.scheduler.cost.measure import measure

    cloud_path, edge_path = save_tiny_pair(str(tmp_path / "tiny"))
    measured = {}
    for side, path in (("cloud", cloud_path), ("edge", edge_path)):
        d = measure(load_model(path), name=f"tiny-{side}@here", model_name=f"tiny-{side}", steps=10, repeats=1,
                    warmup=0)
        assert d["sources"]["unet_step_s"].startswith("measured here by latentwire profile, ")
        assert "torch threads" in d["sources"]["unet_step_s"] and set(d["unet_step_s_batch"]) == {"1", "2", "4"}
        measured[side] = load_device(write(tmp_path, d))
    assert measured["cloud"].latent_shape == (4, 8, 8) and measured["cloud"].resolution == 64
    cost = predict(make("hybrid-sd", 10, k=4), measured["cloud"], measured["edge"], load_link(write(tmp_path, link())))
    _check_parts(cost)
    assert cost.latency_s > 0 and cost.bytes_up > 0 and cost.bytes_down > 0
    big = measure(load_model(cloud_path), name="t@here", model_name="t", resolution=128, steps=4, repeats=1,
                  warmup=0, batch_sizes=(1,))
    assert big["latent_shape"] == [4, 16, 16] and big["resolution"] == 128
    with pytest.raises(ValueError, match="resolution"):
        measure(load_model(cloud_path), name="t@here", model_name="t", resolution=60)


def test_parse_link_reads_link_profiles(tmp_path):
    path = write(tmp_path, link("asym", up=8.0, down=80.0, rtt=30.0))
    emulated = parse_link(path)
    assert emulated == Link("asym", 8.0, 15.0, 80.0)
    assert emulated.transfer_s(1000) == pytest.approx(0.015 + 8000 / 8e6)
    assert emulated.transfer_s(1000, down=True) == pytest.approx(0.015 + 8000 / 80e6)
    assert Link("x", 10, 50).transfer_s(125_000, down=True) == pytest.approx(0.05 + 0.1)  # symmetric as before
    for name in list_profiles()["links"]:
        assert parse_link(name).name == name
    with pytest.raises(ValueError, match="link profile"):
        parse_link("nonsense")


# -- the command line -----------------------------------------------------------------------------------

def _cli(*args, code=None):
    """`latentwire ARGS` in this process; with ``code``, that Python code in a fresh interpreter (what it
    imports is the point), with ARGS as its sys.argv[1:]."""
    if code is None:
        return run_cli(*args)
    return subprocess.run([sys.executable, "-P", "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cost_prints_json(tmp_path):
    c = write(tmp_path, device("big@gpu", batch={"1": 0.05, "4": 0.12}))
    e = write(tmp_path, device("small@phone", unet=0.5))
    lk = write(tmp_path, link())
    r = _cli("cost", "--plan", "ec-diff", "--p", "7", "--k", "2", "--a", "0.3", "--s", "37", "--steps", "50",
             "--cloud-device", c, "--edge-device", e, "--link", lk, "--load", "0.5", "--cloud-batch", "4",
             "--preview-every", "5", "--latent-codec", "int8", "--latent-level", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"latency_s", "cloud_gpu_s", "edge_s", "bytes_up", "bytes_down", "parts"} <= set(out)
    assert set(out["parts"]) == set(cost_model.PARTS) and out["parts"]["queue"] > 0 and out["bytes_down"] > 0
    plan = make("ec-diff", 50, p=7, k=2, a=0.3, s=37)
    expected = predict(plan, load_device(c), load_device(e), load_link(lk), load=0.5, cloud_batch=4, preview_every=5)
    assert out["latency_s"] == pytest.approx(expected.latency_s) and out["bytes_up"] == expected.bytes_up
    r = _cli("cost", "--plan", "hybrid-sd", "--steps", "20", "--cloud-device", c, "--edge-device", e, "--link", lk)
    assert r.returncode == 0 and "latency" in r.stdout and "bytes up" in r.stdout, r.stderr


@pytest.mark.parametrize("args,says", [
    (["--cloud-device", "nope@nowhere"], "no device profile"),
    (["--load", "1.0"], "load"),
    (["--cloud-batch", "3"], "cloud_batch 3"),
    (["--latent-codec", "zip"], "--latent-codec"),
    (["--plan", "nope"], "unknown plan"),
    (["--link", None], "--link"),
])
def test_cost_errors_are_clear_exits(tmp_path, args, says):
    base = {"--cloud-device": write(tmp_path, device("big@gpu", batch={"1": 0.05, "4": 0.12})),
            "--edge-device": write(tmp_path, device("small@phone")), "--link": write(tmp_path, link())}
    flags = dict(zip(args[::2], args[1::2]))
    base.update(flags)
    argv = ["cost", "--steps", "10"] + [x for k, v in base.items() if v is not None for x in (k, v)]
    r = _cli(*argv)
    assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cost_list_imports_no_torch():
    code = ("import sys, json; from latentwire.cli import main; main(sys.argv[1:]); "
            "print(json.dumps('torch' in sys.modules))")
    r = _cli("cost", "--list", "--json", code=code)
    assert r.returncode == 0, r.stderr
    listed, torch_imported = r.stdout.splitlines()
    assert json.loads(listed) == list_profiles() and json.loads(torch_imported) is False
    r = _cli("cost", "--list")
    assert r.returncode == 0 and "devices:" in r.stdout and "links:" in r.stdout


def test_profile_command_writes_a_loadable_profile(tmp_path):
    from latentwire.pipelines.models.tiny import save_tiny_pipeline

    folder = save_tiny_pipeline(str(tmp_path / "tiny"), edge=True)
    out = tmp_path / "tiny.json"
    r = _cli("profile", "--model", folder, "--out", str(out), "--name", "tiny@here", "--steps", "5", "--repeats", "1",
             "--threads", "1")
    assert r.returncode == 0, r.stderr
    p = load_device(str(out))
    assert p.name == "tiny@here" and "torch threads 1" in p.sources["unet_step_s"] and p.unet_step_s_batch
    r = _cli("profile", "--model", str(tmp_path / "absent"), "--out", str(out))
    assert r.returncode != 0 and "not a folder" in r.stderr and "Traceback" not in r.stderr


def test_assume_fills_a_missing_figure_and_says_so(trio, tmp_path):
    cloud, edge, lk = trio
    d = device("notext@gpu", text=None, missing=["text_encode_s"])
    d["sources"].pop("text_encode_s")
    notext = load_device(write(tmp_path, d))
    with pytest.raises(ProfileError, match="text_encode_s"):
        predict(make("cloud-only", 5), notext, edge, lk)
    filled = assume(notext, "text_encode_s", 0.25)
    assert filled.text_encode_s == 0.25 and "text_encode_s" not in filled.missing
    assert filled.sources["text_encode_s"].startswith("ASSUMED") and notext.text_encode_s is None  # a copy
    base = predict(make("cloud-only", 5), assume(notext, "text_encode_s", 0.0), edge, lk)
    more = predict(make("cloud-only", 5), filled, edge, lk)
    assert more.latency_s - base.latency_s == pytest.approx(0.25) and more.parts["text_encode"] >= 0.25
    for figure, seconds, says in (("latent_shape", 1.0, "cannot be assumed"), ("unet_step_s", -1.0, "seconds"),
                                  ("unet_step_s", float("nan"), "seconds"), ("unet_step_s", "1", "seconds")):
        with pytest.raises(ProfileError, match=says):
            assume(cloud, figure, seconds)


def test_cost_assume_on_the_command_line(tmp_path):
    d = device("notext@gpu", text=None, missing=["text_encode_s"])
    d["sources"].pop("text_encode_s")
    c, e, lk = write(tmp_path, d), write(tmp_path, device("small@phone")), write(tmp_path, link())
    args = ["cost", "--plan", "cloud-only", "--steps", "5", "--cloud-device", c, "--edge-device", e, "--link", lk]
    r = _cli(*args, "--json")
    assert r.returncode != 0 and "text_encode_s" in r.stderr and "Traceback" not in r.stderr
    r = _cli(*args, "--assume", "cloud.text_encode_s=0.5", "--assume", "edge.vae_decode_s=0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["assumed"] == {"cloud.text_encode_s": 0.5, "edge.vae_decode_s": 0.0} and out["parts"]["decode"] == 0
    assert out["parts"]["text_encode"] == pytest.approx(0.5)
    r = _cli(*args, "--assume", "cloud.text_encode_s=0.5")
    assert r.returncode == 0 and "ASSUMED: cloud.text_encode_s = 0.5 s" in r.stdout, r.stderr
    for bad in ("cloud.latent_shape=1", "gpu.text_encode_s=1", "cloud.text_encode_s=fast", "cloud.text_encode_s=-1"):
        r = _cli(*args, "--assume", bad)
        assert r.returncode != 0 and ("--assume" in r.stderr or "seconds" in r.stderr), (bad, r.stderr)
        assert "Traceback" not in r.stderr


def test_measure_warms_every_call_before_timing_any():
    from latentwire.scheduler.cost import measure as m

    log = []

    class Model:
        latent_shape, device, dtype = (4, 2, 2), "cpu", None

        def make_scheduler(self, name=None):
            from diffusers import DDIMScheduler
            return DDIMScheduler()

        def encode_prompt(self, prompt, negative):
            log.append("text")
            return torch.zeros(1, 3, 8), torch.zeros(1, 3, 8)

        def predict(self, x, t, c, u, scheduler=None, guidance=None):
            log.append(f"unet{x.shape[0]}")
            return torch.zeros_like(x), torch.zeros_like(x)

        def decode(self, x):
            log.append("decode")

    Model.dtype = torch.float32
    d = m.measure(Model(), name="fake@here", model_name="fake", steps=4, repeats=3, warmup=1, batch_sizes=(1, 2))
    assert set(d["unet_step_s_batch"]) == {"1", "2"} and d["vae_decode_s"] > 0
    first_decode = log.index("decode")
    # after the setup calls (one text encoding and one UNet call), every call is warmed before any is timed:
    # the first decode comes before the last warm-up UNet call's timed repeats
    timed = log[first_decode + 1:]
    assert timed[:6] == ["text"] * 3 + ["unet1"] * 3 and timed.count("decode") == 3
