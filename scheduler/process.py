"""Waiting for a daemon started as a child process to say it is ready."""
import select
import time


def wait_ready(proc, marker, timeout_s):
    """Read ``proc``'s stdout (a text pipe) line by line until one holds ``marker`` -> True; False if the
    process exits or closes its stdout first, or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        readable, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            return False
        line = proc.stdout.readline()
        if not line:
            return False
        if marker in line:
            return True
    return False
