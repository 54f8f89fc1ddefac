"""A field-level fuzz of a live `latentwire cloud`: every field of every request kind (and inside the
session, its plan, its segments, its scheduler config and the codecs) is replaced by a value of another
type (list, map, str, bytes, NaN, inf, huge ints, 100-deep nesting), an out-of-range or oversized one,
deleted, or joined by an extra field. The header is packed by hand, as a hostile client would, so the
encoder's own checks do not filter what the daemon sees. After every message the daemon answers health;
a message whose field has the wrong shape gets an error that names that field; at the end a valid session
completes and equals its solo run. The daemon never exits.

Bounded: a fixed number of hypothesis examples (derandomized), each waited for at most WAIT_S."""
import math

import daemons
import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from latentwire.pipelines.models.sd import StableDiffusionModel
from latentwire.pipelines.models.tiny import save_tiny_pair
from latentwire.scheduler import SessionSpec, make, run_plan, wire
from latentwire.scheduler.serving.edge import EdgeClient
from latentwire.scheduler.wire import Codecs

EXAMPLES = 1000
WAIT_S = 30
EXACT = Codecs(latent=("fp32", 0), state=("fp32", 0))
MAX_STEPS = 50  # the daemon's --max-steps-per-session: a mutated step count cannot make a long session


def _deep(n):
    v = 0
    for _ in range(n):
        v = [v]
    return v


HOSTILE = [[], [1, 2], {}, {"a": 1}, "", "x" * 300, b"\x00\xff", math.nan, math.inf, -math.inf, -1, 0,
           1 << 63, (1 << 64) - 1, -(1 << 63), 10 ** 6, 3.5, True, None, _deep(100), {"": _deep(50)}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cloud_path, edge_path = save_tiny_pair(tmp_path_factory.mktemp("models"), seed=0)
    return str(cloud_path), str(edge_path)


@pytest.fixture(scope="module")
def models(pair):
    return {"cloud": StableDiffusionModel.from_pretrained(pair[0]), "edge": StableDiffusionModel.from_pretrained(pair[1])}


@pytest.fixture(scope="module")
def daemon(pair, tmp_path_factory):
    bind = f"ipc://{tmp_path_factory.mktemp('fuzz')}/cloud.sock"
    proc = daemons.start("cloud", "--bind", bind, "--model", pair[0], "--max-steps-per-session", str(MAX_STEPS))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(bind)
    yield proc, bind, sock
    sock.close()
    assert daemons.stop(proc) == 0


def _spec(model, steps=3, plan="hybrid-sd"):
    s = model.make_scheduler("DDIMScheduler")
    return SessionSpec(prompt="a red circle", plan=make(plan, steps), scheduler=type(s).__name__,
                       scheduler_config=dict(s.config), guidance_scale=5.0, seed=1)


def _valid(models):
    """The plain meta of a valid run request (the cloud's first segment of a hybrid plan), a cancel, a health."""
    run = wire.Run(_spec(models["cloud"]), (0, 1), session_id="fuzz", deadline_s=20.0,
                   latent_space=wire.plain(models["cloud"].latent_space),
                   text_space=wire.plain(models["cloud"].text_space))
    meta = msgpack.unpackb(bytes(run.to_frames()[0]), raw=False)["s"]
    return {"run": meta, "cancel": {"kind": "cancel"}, "health": {"kind": "health"}}


def _paths(value, prefix=()):
    """Every field path inside a plain value: map keys and list indices, containers included."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_paths(v, prefix + (k,)))
    return out


def _mutate(meta, path, action, value):
    """A copy of meta with the field at path replaced (or deleted, or joined by a sibling 'zzz')."""
    meta = msgpack.unpackb(msgpack.packb(meta), raw=False, strict_map_key=False)  # a deep copy
    parent = meta
    for k in path[:-1]:
        parent = parent[k]
    if action == "replace":
        parent[path[-1]] = value
    elif action == "delete":
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    else:
        target = parent[path[-1]]
        if isinstance(target, dict):
            target["zzz"] = value
        else:
            parent[path[-1]] = [target, value] if not isinstance(target, list) else target + [value]
    return meta


def _wrong_shape(original, value):
    """A replacement that no field could take: a container where none was, or a non-finite number."""
    if isinstance(value, float) and not math.isfinite(value):
        return original is not None and not isinstance(original, str)
    return isinstance(value, (list, dict, bytes)) and type(original) is not type(value) and original is not None


SEGMENT_ITEMS = ("side", "start", "stop", "forecast", "renoise")  # a segment travels as a list


def _field_name(path):
    """The dotted name the daemon gives a field: a plan segment's items by their names."""
    names = list(map(str, path))
    if path[:3] == ("session", "plan", "segments") and len(path) >= 5:
        names[4] = SEGMENT_ITEMS[path[4]]
    return ".".join(names)


def _final(sock, request):
    """The last reply to request: an Error, a Handoff, or (health) a Health; beats and previews skipped."""
    while True:
        assert sock.poll(WAIT_S * 1000), f"no reply to request {request!r} within {WAIT_S} s"
        frames = sock.recv_multipart()
        if frames[0] != request:
            continue  # a reply to an earlier request still arriving
        m = wire.parse_reply(frames[1:])
        if not isinstance(m, (wire.Beat, wire.Preview)):
            return m


def _send(sock, request, meta):
    sock.send_multipart([request, msgpack.packb({"m": b"LW", "v": 1, "t": [], "s": meta}, use_bin_type=True)])


_counter = iter(range(1 << 30))


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_field_fuzzed_daemon_answers_every_message_and_names_the_field(daemon, models, data):
    proc, bind, sock = daemon
    valid = _valid(models)
    kind = data.draw(st.sampled_from(["run"] * 8 + ["cancel", "health"]))
    meta = valid[kind]
    path = data.draw(st.sampled_from(_paths(meta)))
    action = data.draw(st.sampled_from(["replace"] * 4 + ["delete", "extra"]))
    value = data.draw(st.sampled_from(HOSTILE) | st.integers(-(1 << 63), (1 << 64) - 1)
                      | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
    mutated = _mutate(meta, path, action, value)
    request = next(_counter).to_bytes(4, "big")
    _send(sock, request, mutated)
    if kind == "cancel" and mutated == valid["cancel"]:
        pass  # a valid cancel of nothing: no reply
    else:
        reply = _final(sock, request)
        original = meta
        for k in path:
            original = original[k]
        if action == "replace" and _wrong_shape(original, value) and kind == "run":
            field = _field_name(path)
            assert isinstance(reply, wire.Error) and reply.code in ("refused", "limit"), (field, value, reply)
            # the protocol's decoder refuses what no header may hold (nesting deeper than it allows, a header
            # over its size) and names the place its own way: meta['session']['plan']...
            where = "meta" + "".join(f"[{k!r}]" for k in path)
            if "header frame is" not in reply.message and where not in reply.message:
                assert reply.field is not None and (field + ".").startswith(reply.field + "."), (field, reply)
        elif kind == "health" and mutated == valid["health"]:
            assert isinstance(reply, wire.Health)
        elif kind in ("cancel", "health"):
            assert isinstance(reply, wire.Error) and reply.code == "refused"
    probe = next(_counter).to_bytes(4, "big")
    _send(sock, probe, valid["health"])
    assert isinstance(_final(sock, probe), wire.Health) and proc.poll() is None


BAD_TENSORS = [  # (name, tensor) a run request may carry, each of which the cloud must refuse alone
    ("latent", torch.full((1, 4, 8, 8), math.nan)), ("latent", torch.full((1, 4, 8, 8), math.inf)),
    ("latent", torch.full((1, 4, 8, 8), 3e38)), ("latent", torch.zeros(1, 4, 8, 9)), ("latent", torch.zeros(4, 8, 8)),
    ("latent", torch.zeros(2, 4, 8, 8)), ("solver/x0_prev", torch.zeros(1, 4, 8, 9)), ("solver/ets.7", torch.zeros(1)),
    ("solver/secret", torch.zeros(1, 4, 8, 8)), ("surprise", torch.zeros(1, 4, 8, 8)),
]


@pytest.mark.parametrize("name, tensor", BAD_TENSORS, ids=lambda v: v if isinstance(v, str) else None)
def test_a_bad_tensor_in_a_run_request_is_refused_or_fails_alone(daemon, models, name, tensor):
    from latentwire.protocol import encode_message

    proc, bind, sock = daemon
    meta = _valid(models)["run"]
    request = next(_counter).to_bytes(4, "big")
    sock.send_multipart([request] + encode_message({name: tensor}, meta, codec="fp32", level=0))
    reply = _final(sock, request)
    assert isinstance(reply, wire.Error) and reply.code in ("refused", "model"), (name, reply)
    probe = next(_counter).to_bytes(4, "big")
    _send(sock, probe, _valid(models)["health"])
    assert isinstance(_final(sock, probe), wire.Health) and proc.poll() is None


def test_after_the_fuzz_a_valid_session_equals_its_solo_run(daemon, models):
    proc, bind, _ = daemon
    spec = _spec(models["cloud"], steps=6)
    latent, summary = EdgeClient(bind, models["edge"], codecs=EXACT, timeout_s=WAIT_S).generate(spec)
    assert torch.equal(latent, run_plan(spec, models)[0]) and proc.poll() is None
    assert EdgeClient(bind, None, timeout_s=WAIT_S).health()["jobs"] == 0  # no session was stranded
