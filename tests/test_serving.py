"""Serving many edges: cancel, deadlines, heartbeats, named limits, health, metrics and logs on a cloud in
this process; a worker pool that loses no session when a worker dies, and a fuzzed daemon that serves on,
as real processes. Everything on ipc:// with bounded waits."""
import json
import logging
import os
import random
import signal
import threading
import time
import urllib.request

import daemons
import pytest
import torch
import zmq

from latentwire.pipelines.models.sd import StableDiffusionModel
from latentwire.pipelines.models.tiny import save_tiny_pair
from latentwire.protocol import wire_bytes
from latentwire.scheduler import SessionSpec, make, run_plan, wire
from latentwire.scheduler.serving.cloud import CloudServer
from latentwire.scheduler.serving.edge import Cancelled, CloudError, CloudUnavailable, EdgeClient
from latentwire.scheduler.limits import ServingLimits
from latentwire.scheduler.logs import JsonFormatter
from latentwire.scheduler.wire import Codecs
from fakes import Slow

EXACT = Codecs(latent=("fp32", 0), state=("fp32", 0))
WAIT_S = 30  # any single wait here; the tiny model's steps take milliseconds


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cloud_path, edge_path = save_tiny_pair(tmp_path_factory.mktemp("models"), seed=0)
    return str(cloud_path), str(edge_path)


@pytest.fixture(scope="module")
def models(pair):
    return {"cloud": StableDiffusionModel.from_pretrained(pair[0]), "edge": StableDiffusionModel.from_pretrained(pair[1])}


def _spec(model, steps, prompt="a red circle", seed=1, plan="cloud-only"):
    s = model.make_scheduler("DDIMScheduler")
    return SessionSpec(prompt=prompt, plan=make(plan, steps), scheduler=type(s).__name__,
                       scheduler_config=dict(s.config), guidance_scale=5.0, seed=seed)


class _Served:
    """A CloudServer on a thread of this process, stopped at exit."""

    def __init__(self, model, bind, **kw):
        self.server = CloudServer(model, bind, **kw)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"install_signals": False})

    def __enter__(self):
        self.thread.start()
        return self.server

    def __exit__(self, *exc):
        self.server.stop()
        self.thread.join(timeout=WAIT_S)
        assert not self.thread.is_alive()


def _count(server, name, **labels):
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


def _until(condition, what, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("max_batch", [1, 4])
def test_cancel_frees_the_slot_at_a_step_boundary(models, tmp_path, max_batch):
    bind = f"ipc://{tmp_path}/c.sock"
    with _Served(Slow(models["cloud"], 0.02), bind, max_batch=max_batch,
                 limits=ServingLimits(max_sessions=1)) as server:
        long = EdgeClient(bind, models["edge"], timeout_s=WAIT_S)
        outcome = []
        thread = threading.Thread(target=lambda: outcome.append(_catch(long.generate, _spec(models["cloud"], 500))))
        thread.start()
        health = EdgeClient(bind, None, timeout_s=WAIT_S)
        _until(lambda: health.health()["jobs"] == 1, "the long session to be admitted")
        other = EdgeClient(bind, models["edge"], timeout_s=WAIT_S, retries=0)
        with pytest.raises(CloudUnavailable, match="--max-sessions"):  # the one slot is taken
            other.generate(_spec(models["cloud"], 4))
        long.cancel()
        thread.join(timeout=WAIT_S)
        assert isinstance(outcome[0], Cancelled)
        _until(lambda: health.health()["jobs"] == 0, "the cancelled session to leave")
        latent, summary = other.generate(_spec(models["cloud"], 4))  # the slot is free again
        assert summary.cloud_model_calls == 4
        assert _count(server, "latentwire_sessions_total", outcome="cancelled") == 1
        assert _count(server, "latentwire_steps_total", kind="real") < 500 + 4


def _catch(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        return e


def test_a_session_past_its_deadline_ends_at_the_next_step_and_the_edge_can_finish_it(models, tmp_path):
    bind = f"ipc://{tmp_path}/d.sock"
    with _Served(Slow(models["cloud"], 0.05), bind) as server:
        spec = _spec(models["cloud"], 100)  # 5 s of cloud steps, against a deadline of 0.5 s
        start = time.monotonic()
        with pytest.raises(CloudUnavailable, match="did not finish in time"):
            EdgeClient(bind, models["edge"], timeout_s=WAIT_S, deadline_s=0.5, retries=0).generate(spec)
        assert time.monotonic() - start < 3
        assert _count(server, "latentwire_sessions_total", outcome="deadline") == 1
        latent, summary = EdgeClient(bind, models["edge"], timeout_s=WAIT_S, deadline_s=0.5,
                                     fallback=True).generate(spec)
        assert summary.degraded and summary.edge_model_calls > 0 and torch.isfinite(latent).all()


def test_a_slow_cloud_that_beats_is_waited_for(models, tmp_path):
    bind = f"ipc://{tmp_path}/s.sock"
    with _Served(Slow(models["cloud"], 0.3), bind, heartbeat_s=0.1):  # every step outlasts two beats
        spec = _spec(models["cloud"], 8)
        client = EdgeClient(bind, models["edge"], codecs=EXACT, timeout_s=WAIT_S, heartbeat_timeout_s=1.0)
        latent, summary = client.generate(spec)
    assert client.attempts == 1 and not summary.degraded  # 2.4 s of silence-free waiting, no retry
    assert torch.equal(latent, run_plan(spec, models)[0])


def _raw(bind):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(bind)
    return sock


def _reply(sock):
    assert sock.poll(WAIT_S * 1000), "no reply"
    frames = sock.recv_multipart()
    return frames[0], wire.parse_reply(frames[1:])


def _run_request(spec, model):
    return wire.Run(spec, (0, 1), latent_space=wire.plain(model.latent_space),
                    text_space=wire.plain(model.text_space)).to_frames()


def test_limits_are_named_and_a_refused_message_does_not_stop_the_others(models, tmp_path):
    bind = f"ipc://{tmp_path}/l.sock"
    limits = ServingLimits(max_message_bytes=4096, max_steps_per_session=50, max_sessions_per_client=1)
    with _Served(Slow(models["cloud"], 0.01), bind, limits=limits) as server:
        sock = _raw(bind)
        sock.send_multipart([b"big", b"x" * 5000])
        rid, m = _reply(sock)
        assert (rid, m.code) == (b"big", "limit") and "--max-message-bytes" in m.message
        sock.send_multipart([b"bad", b"not a latentwire header"])
        rid, m = _reply(sock)
        assert (rid, m.code) == (b"bad", "refused") and "malformed" in m.message
        sock.send_multipart([b"lonely"])  # no body: nothing to answer to, dropped
        with pytest.raises(CloudError, match="at most 50"):
            EdgeClient(bind, models["edge"], timeout_s=WAIT_S).generate(_spec(models["cloud"], 60))
        # one connection, two sessions at once: the second is over the per-client limit
        sock.send_multipart([b"one"] + _run_request(_spec(models["cloud"], 40), models["cloud"]))
        sock.send_multipart([b"two"] + _run_request(_spec(models["cloud"], 4), models["cloud"]))
        replies = {}
        while len(replies) < 2:
            rid, m = _reply(sock)
            if not isinstance(m, wire.Beat):
                replies[rid] = m
        assert replies[b"two"].code == "limit" and "--max-sessions-per-client" in replies[b"two"].message
        assert isinstance(replies[b"one"], wire.Handoff) and replies[b"one"].model_calls == 40
        sock.close()
        assert _count(server, "latentwire_errors_total", code="limit") == 3


def test_health_metrics_and_session_logs(models, tmp_path, caplog):
    bind = f"ipc://{tmp_path}/m.sock"
    with _Served(models["cloud"], bind, preview_every=2) as server:
        port = server.metrics.serve(0)
        client = EdgeClient(bind, models["edge"], timeout_s=WAIT_S)
        with caplog.at_level(logging.INFO, logger="latentwire.cloud"):
            client.generate(_spec(models["cloud"], 6, plan="cloud-only"))
        health = client.health()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT_S).read().decode()
        server.metrics.close()
    assert health["status"] == "ok" and health["jobs"] == 0 and health["pid"] == os.getpid()
    # the load: in health, and as the edge last heard it (its handoff: itself running, nothing queued)
    assert health["queued"] == 0 and 0 < health["utilisation"] <= 1
    assert client.load.running == 1 and client.load.queued == 0 and 0 < client.load.utilisation <= 1
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples["latentwire_sessions_queued"] == 0 and 0 < samples["latentwire_utilisation"] <= 1
    assert samples['latentwire_sessions_total{outcome="finished"}'] == 1
    assert samples['latentwire_steps_total{kind="real"}'] == 6
    assert samples['latentwire_bytes_total{direction="in"}'] > 0 and samples['latentwire_bytes_total{direction="out"}'] > 0
    assert samples["latentwire_request_seconds_count"] == 1 and samples["latentwire_queue_wait_seconds_count"] == 1
    mine = [r for r in caplog.records if getattr(r, "fields", {}).get("session") == client.session_id]
    assert [r.getMessage() for r in mine] == ["admitted", "finished"]
    line = json.loads(JsonFormatter().format(mine[-1]))
    assert line["event"] == "finished" and line["session"] == client.session_id and line["model_calls"] == 6


def test_a_worker_pool_loses_no_session_when_a_worker_is_killed_or_stopped(pair, models, tmp_path):
    bind = f"ipc://{tmp_path}/pool.sock"
    # one thread each: two workers with every core's threads would spin against each other (and the
    # expected latent is computed with one thread too, for bitwise equality)
    pool = daemons.start("cloud", "--workers", "2", "--threads", "1", "--bind", bind, "--model", pair[0],
                         "--preview-every", "1", "--heartbeat", "0.2", same_threads=False)
    try:
        spec = _spec(models["cloud"], 40)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            expected = run_plan(spec, models)[0]
        finally:
            torch.set_num_threads(threads)

        def session_with(sig):
            """Run the session, sending ``sig`` to the worker running it at the first preview -> (that
            worker's pid, the client, the result)."""
            hit = []

            def signal_the_worker(step, x):
                if not hit:
                    hit.append(client.worker)
                    os.kill(client.worker, sig)

            # silence of 5 s means dead: well above a step of the tiny model, even on a busy two-core machine
            client = EdgeClient(bind, models["edge"], codecs=EXACT, timeout_s=WAIT_S, heartbeat_timeout_s=5.0,
                                on_preview=signal_the_worker)
            result = client.generate(spec)
            return hit[0] if hit else None, client, result

        killed, client, (latent, summary) = session_with(signal.SIGKILL)  # dies at once
        assert killed and client.attempts == 2 and client.worker != killed  # retried on the other worker
        assert not summary.degraded and torch.equal(latent, expected)  # the same result as if nothing happened
        _until(lambda: "worker restarted" in daemons.log_text(pool), "the pool to restart the killed worker")
        stopped, client, (latent, summary) = session_with(signal.SIGTERM)  # finishes this session, then exits
        assert client.attempts == 1 and client.worker == stopped and torch.equal(latent, expected)
        # both replaced: health requests, round robin, reach two new workers (while the second one starts, a
        # request can find no worker at all and go unanswered: that is what the edge's retries are for)
        pids, deadline = set(), time.monotonic() + daemons.READY_TIMEOUT_S
        while len(pids - {killed, stopped}) < 2:
            assert time.monotonic() < deadline, f"the pool did not replace both workers: {pids}"
            try:
                pids.add(EdgeClient(bind, None, timeout_s=WAIT_S, heartbeat_timeout_s=2.0).health()["pid"])
            except CloudUnavailable:
                pass
    finally:
        assert daemons.stop(pool) == 0


def _mutations(valid, rng, n):
    """Random and mutated messages: garbage frames, flipped bytes, cut frames, lost and doubled frames."""
    for _ in range(n):
        frames = [bytearray(f) for f in valid]
        kind = rng.randrange(5)
        if kind == 0:
            frames = [bytearray(rng.randbytes(rng.randrange(0, 64))) for _ in range(rng.randrange(1, 4))]
        elif kind == 1:
            f = rng.randrange(len(frames))
            for _ in range(rng.randrange(1, 8)):
                if frames[f]:
                    frames[f][rng.randrange(len(frames[f]))] ^= 1 << rng.randrange(8)
        elif kind == 2:
            f = rng.randrange(len(frames))
            frames[f] = frames[f][:rng.randrange(len(frames[f]) + 1)]
        elif kind == 3 and len(frames) > 1:
            del frames[rng.randrange(len(frames))]
        else:
            frames.insert(rng.randrange(len(frames) + 1), frames[rng.randrange(len(frames))])
        yield [bytes(f) for f in frames]


def test_a_fuzzed_daemon_stays_up_and_answers_the_next_valid_request_correctly(pair, models, tmp_path):
    bind = f"ipc://{tmp_path}/fuzz.sock"
    proc = daemons.start("cloud", "--bind", bind, "--model", pair[0])
    try:
        sock = _raw(bind)
        spec = _spec(models["cloud"], 3)
        valid = _run_request(spec, models["cloud"])
        sent = 0
        for n, frames in enumerate(_mutations(valid, random.Random(0), 300)):
            sock.send_multipart([n.to_bytes(4, "big")] + frames)
            sent += wire_bytes(frames)
        answered = 0
        while sock.poll(2000):  # every message gets an answer (an error, or a handoff) or is dropped
            frames = sock.recv_multipart()
            if not isinstance(wire.parse_reply(frames[1:]), wire.Beat):
                answered += 1
        sock.close()
        assert proc.poll() is None and answered >= 200
        latent, summary = EdgeClient(bind, models["edge"], codecs=EXACT, timeout_s=WAIT_S).generate(spec)
        assert torch.equal(latent, run_plan(spec, models)[0])
    finally:
        assert daemons.stop(proc) == 0


def test_the_per_client_limit_counts_a_curve_key_across_connections(models, tmp_path):
    from latentwire.scheduler.serving.security import write_keys

    for name in ("server", "alice"):
        write_keys(tmp_path / "keys", name)
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "alice.key").write_bytes((tmp_path / "keys" / "alice.key").read_bytes())
    bind = f"ipc://{tmp_path}/k.sock"
    keys = {"curve_secret": tmp_path / "keys" / "alice.key_secret", "server_key": tmp_path / "keys" / "server.key"}
    with _Served(Slow(models["cloud"], 0.02), bind, limits=ServingLimits(max_sessions_per_client=1),
                 curve_secret=tmp_path / "keys" / "server.key_secret", allow=tmp_path / "allowed"):
        long = EdgeClient(bind, models["edge"], timeout_s=WAIT_S, **keys)
        outcome = []
        thread = threading.Thread(target=lambda: outcome.append(_catch(long.generate, _spec(models["cloud"], 500))))
        thread.start()
        health = EdgeClient(bind, None, timeout_s=WAIT_S, **keys)
        _until(lambda: health.health()["jobs"] == 1, "the long session to be admitted")
        with pytest.raises(CloudError, match="--max-sessions-per-client"):  # another connection, the same key
            EdgeClient(bind, models["edge"], timeout_s=WAIT_S, **keys).generate(_spec(models["cloud"], 4))
        long.cancel()
        thread.join(timeout=WAIT_S)
        assert isinstance(outcome[0], Cancelled)


def test_a_broker_and_a_worker_started_apart_serve_an_edge(pair, models, tmp_path):
    front, back = f"ipc://{tmp_path}/front.sock", f"ipc://{tmp_path}/back.sock"
    broker = daemons.start("broker", "--bind", front, "--backend", back, ready="edges on")
    try:
        worker = daemons.start("cloud", "--connect", back, "--model", pair[0])
        try:
            spec = _spec(models["cloud"], 6, plan="cloud-only")
            latent, summary = EdgeClient(front, models["edge"], codecs=EXACT, timeout_s=WAIT_S).generate(spec)
            assert summary.cloud_model_calls == 6 and torch.equal(latent, run_plan(spec, models)[0])
        finally:
            assert daemons.stop(worker) == 0
    finally:
        assert daemons.stop(broker) == 0


def test_a_long_request_id_is_dropped_and_a_reused_one_is_refused_while_in_flight(models, tmp_path):
    bind = f"ipc://{tmp_path}/ids.sock"
    with _Served(Slow(models["cloud"], 0.02), bind):
        sock = _raw(bind)
        sock.send_multipart([b"x" * 65] + _run_request(_spec(models["cloud"], 4), models["cloud"]))  # never echoed
        assert not sock.poll(500)
        frames = _run_request(_spec(models["cloud"], 60), models["cloud"])
        sock.send_multipart([b"same"] + frames)
        sock.send_multipart([b"same"] + frames)  # while the first is in flight
        kinds = []
        while not any(isinstance(m, wire.Handoff) for m in kinds):
            rid, m = _reply(sock)
            assert rid == b"same"
            kinds.append(m)
        errors = [m for m in kinds if isinstance(m, wire.Error)]
        assert len(errors) == 1 and "in flight already" in errors[0].message
        sock.close()
