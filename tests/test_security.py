"""CURVE: only edges holding an admitted key get in, a refused edge learns it at once, and a daemon will
not serve a non-loopback address in the clear. Daemons run as real processes on loopback."""
import shutil
import threading
import time

import daemons
import pytest
from runcli import run_cli

from latentwire.pipelines.models.sd import StableDiffusionModel
from latentwire.pipelines.models.tiny import save_tiny_pair
from latentwire.scheduler import SessionSpec, make
from latentwire.scheduler.serving.edge import CloudRefused, CloudUnavailable, EdgeClient
from latentwire.scheduler.serving.security import KeyError_, write_keys

TIMEOUT_S = 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    cloud_path, edge_path = save_tiny_pair(root / "models", seed=0)
    for name in ("server", "alice", "mallory"):
        run = run_cli("keys", str(root / "keys"), name)
        assert run.returncode == 0 and f"{name}.key_secret" in run.stdout
    (root / "allowed").mkdir()
    shutil.copy(root / "keys" / "alice.key", root / "allowed")
    bind = f"ipc://{root}/curve.sock"
    proc = daemons.start("cloud", "--bind", bind, "--model", str(cloud_path), "--curve-secret",
                         str(root / "keys" / "server.key_secret"), "--allow", str(root / "allowed"))
    edge = StableDiffusionModel.from_pretrained(str(edge_path))
    yield root, bind, edge
    assert daemons.stop(proc) == 0


def _spec(model):
    s = model.make_scheduler()
    return SessionSpec(prompt="a red circle", plan=make("cloud-only", 3), scheduler=type(s).__name__,
                       scheduler_config=dict(s.config))


def test_an_admitted_edge_gets_through(setup):
    root, bind, edge = setup
    client = EdgeClient(bind, edge, timeout_s=TIMEOUT_S, curve_secret=root / "keys" / "alice.key_secret",
                        server_key=root / "keys" / "server.key")
    latent, summary = client.generate(_spec(edge))
    assert summary.cloud_model_calls == 3 and latent.shape[1] == 4


def test_an_unknown_key_is_refused_clearly_and_quickly(setup):
    root, bind, edge = setup
    client = EdgeClient(bind, edge, timeout_s=TIMEOUT_S, curve_secret=root / "keys" / "mallory.key_secret",
                        server_key=root / "keys" / "server.key")
    start = time.monotonic()
    with pytest.raises(CloudRefused, match="does not admit this edge's key"):
        client.generate(_spec(edge))
    assert time.monotonic() - start < TIMEOUT_S / 2  # told by the handshake, not by the deadline


class _LateSender(EdgeClient):
    """Sends only once the cloud has refused the handshake: its DEALER then has no pipe to queue on."""

    def _socket(self):
        sock = super()._socket()
        time.sleep(HANDSHAKE_S)
        return sock


HANDSHAKE_S = 1.0  # far longer than a loopback CURVE handshake and its refusal take


@pytest.mark.parametrize("call", ["generate", "health"])
def test_a_refused_edge_that_sends_after_the_refusal_is_told_and_does_not_hang(setup, call):
    # a plain send blocked for good here; which came first, the refusal or the send, was up to the scheduler
    root, bind, edge = setup
    client = _LateSender(bind, edge, timeout_s=TIMEOUT_S, curve_secret=root / "keys" / "mallory.key_secret",
                         server_key=root / "keys" / "server.key", retries=0)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_catch(getattr(client, call),
                                                                    *([_spec(edge)] if call == "generate" else []))))
    thread.start()
    thread.join(TIMEOUT_S * 2)
    assert not thread.is_alive(), "the send blocked"
    assert isinstance(outcome[0], CloudRefused) and "does not admit this edge's key" in str(outcome[0])


def _catch(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # the outcome is checked by the test
        return e


def test_a_plaintext_edge_gets_nothing_through(setup):
    _, bind, edge = setup
    with pytest.raises(CloudUnavailable):  # refused at the handshake, or never answered
        EdgeClient(bind, edge, timeout_s=3.0).generate(_spec(edge))


def test_key_files_are_checked(setup, tmp_path):
    root, bind, edge = setup
    with pytest.raises(KeyError_, match="holds no secret key"):
        EdgeClient(bind, edge, curve_secret=root / "keys" / "alice.key", server_key=root / "keys" / "server.key")._socket()
    with pytest.raises(ValueError, match="needs both"):
        EdgeClient(bind, edge, curve_secret=root / "keys" / "alice.key_secret")
    public, secret = write_keys(tmp_path, "x")
    assert public.exists() and secret.exists()


def test_a_non_loopback_bind_is_refused_without_curve(setup):
    root, _, _ = setup
    run = run_cli("cloud", "--bind", "tcp://0.0.0.0:5599", "--model", str(root / "models" / "cloud"))
    assert run.returncode != 0 and "refusing to serve tcp://0.0.0.0:5599 in the clear" in run.stderr
