"""Requests become typed values only through field checks: each field's type, range and size, at each
limit's edge and one past it, with errors that name the field. (The field fuzz of a live daemon is
tests/test_field_fuzz.py.)"""
import math

import msgpack
import pytest
import torch

from latentwire.scheduler import SessionSpec, make, wire
from latentwire.scheduler.fields import FieldError
from latentwire.scheduler.session import MAX_PROMPT_CHARS


def _meta(**changes):
    spec = SessionSpec(prompt="a red circle", plan=make("hybrid-sd", 10), scheduler="DDIMScheduler",
                       scheduler_config={"num_train_timesteps": 1000, "beta_start": 0.00085, "clip_sample": False})
    meta = msgpack.unpackb(bytes(wire.Run(spec, (0, 1), session_id="s", deadline_s=5.0, latent_space=[4, 8, 0.18],
                                          text_space=[32, 16, 184]).to_frames()[0]), raw=False)["s"]
    for path, value in changes.items():
        parent, keys = meta, path.split("__")
        for k in keys[:-1]:
            parent = parent[int(k) if isinstance(parent, list) else k]
        last = int(keys[-1]) if isinstance(parent, list) else keys[-1]
        if value is _DELETE:
            del parent[last]
        else:
            parent[last] = value
    return meta


_DELETE = object()


def _parse(meta, max_steps=1000):
    header = msgpack.packb({"m": b"LW", "v": 1, "t": [], "s": meta}, use_bin_type=True)
    return wire.parse_request([header], max_steps=max_steps)


def test_a_valid_request_parses_to_typed_values():
    run = _parse(_meta())
    assert isinstance(run, wire.Run) and run.segments == (0, 1) and run.deadline_s == 5.0
    assert run.session.plan == make("hybrid-sd", 10) and run.codecs == wire.Codecs()


@pytest.mark.parametrize("changes, field", [
    ({"codecs": [["int8", 3]]}, "codecs"),  # the field that once stopped the daemon
    ({"codecs": 7}, "codecs"), ({"codecs": "int8"}, "codecs"),
    ({"codecs__latent": ["int9", 3]}, "codecs.latent.0"), ({"codecs__latent": ["int8", 23]}, "codecs.latent.1"),
    ({"codecs__latent": ["int8", 3.0]}, "codecs.latent.1"), ({"codecs__color": ["int8", 3]}, "codecs.color"),
    ({"session__seed": 1 << 63}, "session.seed"), ({"session__seed": -1}, "session.seed"),
    ({"session__seed": 1.0}, "session.seed"), ({"session__seed": True}, "session.seed"),
    ({"session__guidance_scale": math.nan}, "session.guidance_scale"),
    ({"session__guidance_scale": math.inf}, "session.guidance_scale"),
    ({"session__guidance_scale": 100.001}, "session.guidance_scale"),
    ({"session__prompt": "a" * (MAX_PROMPT_CHARS + 1)}, "session.prompt"), ({"session__prompt": b"a"}, "session.prompt"),
    ({"session__scheduler": "HeunDiscreteScheduler"}, "session.scheduler"),
    ({"session__scheduler_config__beta_start": [0.1]}, "session.scheduler_config.beta_start"),
    ({"session__scheduler_config__num_train_timesteps": 10_001}, "session.scheduler_config.num_train_timesteps"),
    ({"session__scheduler_config__clip_sample": 1}, "session.scheduler_config.clip_sample"),
    ({"session__scheduler_config__mystery": {"a": 1}}, "session.scheduler_config.mystery"),
    ({"session__restart_solver": "yes"}, "session.restart_solver"),
    ({"session__plan__num_steps": 0}, "session.plan.num_steps"),
    ({"session__plan__segments__0__0": "moon"}, "session.plan.segments.0.side"),
    ({"session__plan__segments__0__1": 1}, "session.plan.segments"),  # well typed, out of order
    ({"session__plan__segments__0__3": ["ecdiff", 3, 1, math.nan]}, "session.plan.segments.0.forecast.3"),
    ({"session__plan__segments__0__4": 0}, "session.plan.segments.0.renoise"),
    ({"session__plan__segments": [["cloud", 0, 10, [], False]] * 65}, "session.plan.segments"),
    ({"segments": [0, 3]}, "segments.1"), ({"segments": [1, 1]}, "segments"), ({"segments": [0]}, "segments"),
    ({"deadline_s": 0}, "deadline_s"), ({"deadline_s": -1.0}, "deadline_s"), ({"deadline_s": math.nan}, "deadline_s"),
    ({"session_id": "x" * 65}, "session_id"), ({"latent_space": [[4]]}, "latent_space.0"),
    ({"session": _DELETE}, "meta.session"), ({"session__prompt": _DELETE}, "session.prompt"),
    ({"surprise": 1}, "meta.surprise"), ({"session__surprise": 1}, "session.surprise"),
    ({"kind": ["run"]}, "kind"),
])
def test_each_field_is_checked_and_named(changes, field):
    with pytest.raises(FieldError) as e:
        _parse(_meta(**changes))
    assert e.value.field == field and e.value.code == "refused" and field in str(e.value)


@pytest.mark.parametrize("changes", [
    {"session__seed": (1 << 63) - 1}, {"session__seed": 0}, {"session__guidance_scale": 100},
    {"session__guidance_scale": -100.0}, {"session__prompt": "a" * MAX_PROMPT_CHARS}, {"codecs__latent": ["int4", 22]},
    {"codecs__latent": ["fp32", 0]}, {"deadline_s": None}, {"session__scheduler_config__mystery": "a"},
    {"session__scheduler_config__lambda_min_clipped": -math.inf}, {"session__plan__segments__0__3": []},
    {"session_id": "x" * 64}, {"session__scheduler_config__num_train_timesteps": 10_000},
    {"session__plan": {"name": "many", "num_steps": 64, "segments": [["cloud", i, i + 1, [], False] for i in range(64)]}},
])
def test_values_at_each_limits_edge_are_accepted(changes):
    assert isinstance(_parse(_meta(**changes)), wire.Run)


def test_a_plan_re_noises_at_most_once():
    once = [["edge", 0, 10, [], False], ["cloud", 5, 10, [], True]]
    assert isinstance(_parse(_meta(session__plan={"name": "pr", "num_steps": 10, "segments": once}, segments=[1, 2])),
                      wire.Run)
    twice = once + [["cloud", 0, 10, [], True]] * 1  # redoing the schedule again and again is refused
    with pytest.raises(FieldError, match="re-noises at most once") as e:
        _parse(_meta(session__plan={"name": "pr", "num_steps": 10, "segments": twice}))
    assert e.value.field == "session.plan.segments"


def test_an_error_names_a_hostile_field_in_a_bounded_length():
    with pytest.raises(FieldError) as e:
        _parse(_meta(**{"session__" + "k" * 60_000: 1}))
    assert len(e.value.field) <= 200 and e.value.field.startswith("session.kkk")


def test_the_step_limit_is_checked_before_the_schedule_is_built():
    assert _parse(_meta(session__plan=make("cloud-only", 50).to_plain()), max_steps=50).session.plan.num_steps == 50
    with pytest.raises(FieldError) as e:
        _parse(_meta(session__plan=make("cloud-only", 51).to_plain()), max_steps=50)
    assert (e.value.field, e.value.code) == ("session.plan.num_steps", "limit")


def test_cancel_and_health_take_no_fields_and_no_tensors():
    assert isinstance(_parse({"kind": "cancel"}), wire.Cancel)
    assert isinstance(_parse({"kind": "health"}), wire.HealthRequest)
    with pytest.raises(FieldError, match="meta.extra"):
        _parse({"kind": "health", "extra": 1})
    frames = wire.Run(SessionSpec(prompt="a", plan=make("cloud-only", 2), scheduler="DDIMScheduler"), (0, 1),
                      latent=torch.zeros(1, 4, 8, 8)).to_frames()
    header = msgpack.unpackb(bytes(frames[0]), raw=False)
    header["s"] = {"kind": "cancel"}
    with pytest.raises(FieldError, match="carries no tensors"):
        wire.parse_request([msgpack.packb(header, use_bin_type=True), frames[1]])


def test_replies_are_checked_too():
    beat = wire.Beat(3, True).to_frames()
    assert wire.parse_reply(beat) == wire.Beat(3, True)
    loaded = wire.Beat(3, True, wire.Load(queued=2, running=4, utilisation=0.75))
    assert wire.parse_reply(loaded.to_frames()) == loaded
    for bad, says in (({"queued": -1}, "load.queued"), ({"utilisation": 1.5}, "load.utilisation"),
                      ({"running": "4"}, "load.running"), ({"extra": 1}, "load.extra")):
        header = msgpack.unpackb(bytes(loaded.to_frames()[0]), raw=False)
        header["s"]["load"].update(bad)
        with pytest.raises(FieldError, match=says.replace(".", r"\.")):
            wire.parse_reply([msgpack.packb(header, use_bin_type=True)])
    health = wire.Health("ok", 3, 1, 7, 4, 2.5, queued=2, utilisation=0.5)
    assert wire.parse_reply(health.to_frames()) == health and health.load == wire.Load(2, 1, 0.5)
    header = msgpack.unpackb(bytes(beat[0]), raw=False)
    header["s"]["step"] = "3"
    with pytest.raises(FieldError, match="'step'"):
        wire.parse_reply([msgpack.packb(header, use_bin_type=True)])
    error = wire.parse_reply(wire.Error("limit", "too big", "session.prompt").to_frames())
    assert (error.code, error.field) == ("limit", "session.prompt")
    with pytest.raises(FieldError, match="'code'"):
        wire.parse_reply(wire.Error("nonsense", "x").to_frames())
