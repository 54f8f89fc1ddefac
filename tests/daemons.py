"""Real `latentwire` daemons for tests: started on loopback or ipc://, ready when they say so, stopped by
the test. Their logs go to a file, not a pipe: a pipe nobody reads fills up and blocks the daemon."""
import socket
import sys
import tempfile
from pathlib import Path

import torch

from latentwire.scheduler.serving.process import READY_TIMEOUT_S, Child, cli_command

REPO = Path(__file__).resolve().parents[1]  # daemons start here, where the root's kernels/ could shadow an import
CLI = str(Path(sys.executable).with_name("latentwire"))  # the console script: as a user runs `latentwire`


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args, ready="serving", same_threads=True, prefix=()):
    """Run ``latentwire ARGS`` through the launcher until it prints a line with ``ready`` -> the Child (a
    Popen; its log: proc.log_path). A daemon that dies first fails the test at once with its log's end.
    same_threads: a cloud gets this process's torch thread count, since convolutions sum in another order
    with another count and tests compare split runs bit for bit with runs made here. prefix: a command
    that runs it (``ip netns exec NAME``, which execs it: the Popen's pid is the daemon's)."""
    args = [*args] + (["--threads", str(torch.get_num_threads())] if same_threads and args[0] == "cloud" else [])
    log = tempfile.NamedTemporaryFile(prefix="latentwire-daemon-", suffix=".log", delete=False)
    log.close()
    child = Child([*prefix, *cli_command(*args)], log=log.name, cwd=REPO, name=f"latentwire {' '.join(args)}")
    return child.wait_ready(ready, READY_TIMEOUT_S)


def log_text(proc):
    return Path(proc.log_path).read_text()


def stop(proc, timeout=60):
    """SIGTERM, then wait -> its exit code (killed, and the test fails on the code, if it hangs)."""
    return proc.stop(timeout)
