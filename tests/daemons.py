"""Real `latentwire` daemons for tests: started on loopback or ipc://, ready when they say so, stopped by
the test. Their logs go to a file, not a pipe: a pipe nobody reads fills up and blocks the daemon."""
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from latentwire.scheduler.serving.process import wait_ready

CLI = str(Path(sys.executable).with_name("latentwire"))
READY_TIMEOUT_S = 120  # the daemon imports torch, diffusers and transformers (and a pool: N workers) first


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args, ready="serving", same_threads=True, prefix=()):
    """Run ``latentwire ARGS`` until it prints a line with ``ready`` -> the Popen (its log: proc.log_path).
    same_threads: a cloud gets this process's torch thread count, since convolutions sum in another order
    with another count and tests compare split runs bit for bit with runs made here. prefix: a command
    that runs it (``ip netns exec NAME``, which execs it: the Popen's pid is the daemon's)."""
    cmd = [*prefix, CLI, *args]
    if same_threads and args[0] == "cloud":
        cmd += ["--threads", str(torch.get_num_threads())]
    log = tempfile.NamedTemporaryFile(prefix="latentwire-daemon-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log_path = log.name
    if wait_ready(proc, ready, READY_TIMEOUT_S):
        return proc
    proc.kill()
    proc.wait()
    raise RuntimeError(f"`latentwire {' '.join(args)}` did not start within {READY_TIMEOUT_S} s: "
                       f"{Path(log.name).read_text()[-3000:]}")


def log_text(proc):
    return Path(proc.log_path).read_text()


def stop(proc, timeout=60):
    """SIGTERM, then wait -> its exit code (killed, and the test fails on the code, if it hangs)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
