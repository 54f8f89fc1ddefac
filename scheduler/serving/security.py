"""CURVE keys and authentication for the daemons, with pyzmq's own certificate files and authenticator.

    latentwire keys DIR NAME     -> DIR/NAME.key (public) and DIR/NAME.key_secret (secret)

The cloud encrypts and authenticates every connection with its secret key and admits only clients
whose public keys are in a folder; the edge connects with its own secret key and the cloud's public
key. A refused edge learns it from its socket's handshake events, at once, not at its deadline.
"""
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

LOOPBACK_PREFIXES = ("tcp://127.", "tcp://localhost:", "tcp://[::1]:", "ipc://", "inproc://")


class KeyError_(ValueError):
    """A key file or folder that cannot be used; the text says which and why."""


def write_keys(directory, name):
    """-> (public key path, secret key path), pyzmq's certificate format."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    return Path(public), Path(secret)


def load_secret(path):
    """(public, secret) from a NAME.key_secret file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise KeyError_(f"cannot read a secret key from {path}: {e}; make one with `latentwire keys DIR NAME`") from None
    if secret is None:
        raise KeyError_(f"{path} holds no secret key: give the NAME.key_secret file, not NAME.key")
    return public, secret


def load_public(path):
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise KeyError_(f"cannot read a public key from {path}: {e}") from None
    return public


def is_loopback(endpoint):
    return endpoint.startswith(LOOPBACK_PREFIXES)


def serve_curve(socket, context, secret_path, allow_dir, authenticator=None):
    """Make ``socket`` a CURVE server admitting the public keys in ``allow_dir``. -> the authenticator
    (stop it when the socket closes). A second socket of the same context passes the first one's
    ``authenticator``: ZeroMQ asks one authenticator per context."""
    if not Path(allow_dir).is_dir():
        raise KeyError_(f"--allow {allow_dir}: not a folder of client public keys (NAME.key files)")
    public, secret = load_secret(secret_path)
    auth = authenticator
    if auth is None:
        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=str(allow_dir))
    socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True
    return auth


def connect_curve(socket, secret_path, server_key_path):
    public, secret = load_secret(secret_path)
    socket.curve_secretkey, socket.curve_publickey = secret, public
    socket.curve_serverkey = load_public(server_key_path)
