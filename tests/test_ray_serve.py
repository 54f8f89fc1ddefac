"""The cloud on Ray Serve: `latentwire cloud --ray` as a real gateway process in front of two CPU replicas
of the tiny cloud model, in one local Ray instance for the whole module (starting Ray and its replicas
costs seconds; nothing here starts another). A split session through the gateway equals the one-process
run, 16 concurrent sessions complete on both replicas, CURVE and the limits hold at a gateway, and a
replica killed mid-session costs no session. Endpoints are ipc://; every wait is bounded."""
import ipaddress
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import daemons
import pytest
import torch

ray = pytest.importorskip("ray")  # latentwire[ray]: `make test` installs it, so this runs in CI

from latentwire.pipelines.models.sd import StableDiffusionModel  # noqa: E402
from latentwire.pipelines.models.tiny import save_tiny_pair  # noqa: E402
from latentwire.scheduler import SessionSpec, make, run_plan  # noqa: E402
from latentwire.scheduler.limits import ServingLimits  # noqa: E402
from latentwire.scheduler.serving.cloud import CloudServer  # noqa: E402
from latentwire.scheduler.serving.edge import CloudError, CloudRefused, EdgeClient  # noqa: E402
from latentwire.scheduler.serving.rayserve import gateway  # noqa: E402
from latentwire.scheduler.serving.security import write_keys  # noqa: E402
from latentwire.scheduler.wire import Codecs  # noqa: E402

EXACT = Codecs(latent=("fp32", 0), state=("fp32", 0))
APP = "latentwire-test"
WAIT_S = 60  # any single wait: two replicas share two cores with this process
REPO = Path(__file__).resolve().parents[1]


def listening():
    """The TCP sockets listening on this machine -> {(address, port)}, from /proc/net/tcp and tcp6."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            if state == "0A":  # LISTEN
                address, port = local.split(":")
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((str(ipaddress.ip_address(raw)), int(port, 16)))
    return found


def _loopback(address):
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or getattr(ip, "ipv4_mapped", None) is not None and ip.ipv4_mapped.is_loopback


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray instance, and a gateway process that deploys two replicas into it -> (bind, gateway
    process, models)."""
    root = tmp_path_factory.mktemp("ray")
    cloud_path, edge_path = save_tiny_pair(root / "models", seed=0)
    before = listening()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # on loopback: tests/conftest.py
    bind = f"ipc://{root}/gateway.sock"
    proc = None
    try:
        proc = daemons.start("cloud", "--ray", ray.get_runtime_context().gcs_address, "--ray-app", APP,
                             "--replicas", "2", "--replica-cpus", "0.5", "--model", str(cloud_path),
                             "--max-batch", "4", "--preview-every", "5", "--heartbeat", "0.2", "--bind", bind)
        models = {"cloud": StableDiffusionModel.from_pretrained(str(cloud_path)),
                  "edge": StableDiffusionModel.from_pretrained(str(edge_path))}
        opened = listening() - before  # Ray's processes, its replicas' and the gateway's, from the start
        yield bind, proc, models, opened
    finally:
        if proc is not None:
            assert daemons.stop(proc) == 0
        ray.shutdown()


def test_ray_and_its_replicas_listen_on_loopback_only(cluster):
    *_, opened = cluster
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    assert opened, "Ray opened no listening socket: the check saw nothing"
    wide = sorted((a, p) for a, p in opened if not _loopback(a))
    owners = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout if wide else ""
    assert not wide, f"listening beyond loopback: {wide}\n{owners}"


def _spec(model, steps, plan="cloud-only", seed=1, **params):
    s = model.make_scheduler("DDIMScheduler")
    return SessionSpec(prompt="a red circle", plan=make(plan, steps, **params), scheduler=type(s).__name__,
                       scheduler_config=dict(s.config), guidance_scale=5.0, seed=seed)


def _client(bind, models, **kw):
    return EdgeClient(bind, models["edge"], codecs=EXACT, timeout_s=WAIT_S, **kw)


def test_a_split_session_through_the_gateway_equals_the_one_process_run(cluster):
    bind, _, models, _ = cluster
    spec = _spec(models["cloud"], 12, "hybrid-sd", k=5)
    expected = run_plan(spec, models)[0]
    latent, summary = _client(bind, models).generate(spec)
    assert summary.handoffs == 1 and summary.cloud_model_calls == 5 and not summary.degraded
    assert torch.equal(latent, expected)  # alone on its replica: a group of one, the one-process call
    health = EdgeClient(bind, None, timeout_s=WAIT_S).health()
    assert health["replicas"] == 2 and health["max_batch"] == 4 and health["status"] == "ok"


def test_sixteen_concurrent_sessions_complete_on_both_replicas(cluster):
    bind, _, models, _ = cluster
    specs = [_spec(models["cloud"], 8, seed=seed) for seed in range(16)]
    results, workers, errors = {}, {}, []

    def one(i):
        client = _client(bind, models)
        try:
            results[i] = client.generate(specs[i])
            workers[i] = client.worker
        except Exception as e:  # surfaced below, with which session
            errors.append((i, e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT_S * 2)
    assert not errors and len(results) == 16
    assert len(set(workers.values())) == 2  # Serve spread them over both replicas
    for i, spec in enumerate(specs):
        latent, summary = results[i]
        assert not summary.degraded and summary.cloud_model_calls == 8
        # batched with others on its replica: within the forward's batching rounding of the session alone
        torch.testing.assert_close(latent, run_plan(spec, models)[0], rtol=0, atol=1e-4)


@pytest.fixture
def keys(tmp_path):
    for name in ("server", "alice", "mallory"):
        write_keys(tmp_path / "keys", name)
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "alice.key").write_bytes((tmp_path / "keys" / "alice.key").read_bytes())
    return tmp_path / "keys", tmp_path / "allowed"


def test_curve_and_the_limits_hold_at_a_gateway(cluster, keys, tmp_path):
    """A second gateway, in this process, in front of the same replicas: CURVE and its own limits."""
    _, _, models, _ = cluster
    keydir, allowed = keys
    limits = ServingLimits(max_steps_per_session=50, max_sessions_per_client=1)
    engine = gateway.RayEngine(APP, max_batch=4, limits=limits)
    server = CloudServer(None, f"ipc://{tmp_path}/curve.sock", engine=engine, limits=limits,
                         curve_secret=keydir / "server.key_secret", allow=allowed)
    thread = threading.Thread(target=server.serve_forever, kwargs={"install_signals": False})
    thread.start()
    try:
        def client(name):
            return _client(server.endpoint, models, curve_secret=keydir / f"{name}.key_secret",
                           server_key=keydir / "server.key")

        latent, summary = client("alice").generate(_spec(models["cloud"], 3))
        assert summary.cloud_model_calls == 3 and not summary.degraded
        with pytest.raises(CloudRefused, match="does not admit this edge's key"):
            client("mallory").generate(_spec(models["cloud"], 3))
        with pytest.raises(CloudError, match="at most 50"):
            client("alice").generate(_spec(models["cloud"], 60))
        # alice's key on two connections at once: the second session is over the per-client limit
        first = {}
        long_one = threading.Thread(target=lambda: first.update(r=client("alice").generate(_spec(models["cloud"], 49))))
        long_one.start()
        deadline = time.monotonic() + WAIT_S
        while engine.admission.count == 0:
            assert time.monotonic() < deadline, "the first session was never admitted"
            time.sleep(0.005)
        with pytest.raises(CloudError, match="--max-sessions-per-client"):
            client("alice").generate(_spec(models["cloud"], 3))
        long_one.join(timeout=WAIT_S)
        assert first["r"][1].cloud_model_calls == 49
    finally:
        server.stop()
        thread.join(timeout=WAIT_S)
    assert not thread.is_alive()


def test_a_replica_killed_mid_session_costs_no_session(cluster):
    """Last in the module: it leaves Serve restarting a replica (and checks that it does)."""
    bind, proc, models, _ = cluster
    spec = _spec(models["cloud"], 100)
    expected = run_plan(spec, models)[0]
    killed = []

    def kill_its_replica(step, x):  # at the first preview (step 4 of 100) its replica dies at once
        if not killed:
            killed.append(client.worker)
            os.kill(client.worker, signal.SIGKILL)

    client = _client(bind, models, on_preview=kill_its_replica, heartbeat_timeout_s=10.0)
    latent, summary = client.generate(spec)
    assert killed and client.worker != killed[0]  # finished on the other replica
    assert client.attempts == 1 and not summary.degraded  # the gateway retried it: the edge never knew
    assert torch.equal(latent, expected)  # the same inputs, the same result
    assert "a replica died mid-session" in daemons.log_text(proc)
    deadline = time.monotonic() + daemons.READY_TIMEOUT_S  # Serve replaces the dead replica
    while EdgeClient(bind, None, timeout_s=WAIT_S).health()["replicas"] < 2:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(0.5)


def test_replica_options_are_checked_and_become_serve_options():
    assert gateway.ReplicaOptions(2, cpus=0.5).deployment(max_batch=4) == {
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.0}, "max_ongoing_requests": 8, "num_replicas": 2}
    scaled = gateway.ReplicaOptions(1, max_replicas=4, gpus=1).deployment(max_batch=8)["autoscaling_config"]
    assert scaled == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 8}
    for bad, match in ((dict(replicas=0), "replicas must be an int"), (dict(replicas=2, max_replicas=1), "at least"),
                       (dict(cpus=-1), "cpus must be a number"), (dict(target_sessions=0), "target_sessions"),
                       (dict(max_ongoing=1.5), "max_ongoing")):
        with pytest.raises(ValueError, match=match):
            gateway.ReplicaOptions(**bad)


def test_nothing_but_the_rayserve_package_imports_ray():
    """Ray is an optional extra: a module elsewhere that imported it would break every install without it."""
    pattern = re.compile(r"^\s*(import ray\b|from ray\b)", re.M)
    venvs = {p.name for p in REPO.iterdir() if (p / "pyvenv.cfg").exists()}  # .venv, .venv-latest, ...
    offenders = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py")
                 if not venvs & set(p.parts) and "tests" not in p.parts and "bench" not in p.parts
                 and "rayserve" not in p.parts and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
