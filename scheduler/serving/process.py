"""Waiting for a daemon started as a child process to say it is ready.

Why not ``select`` plus ``proc.stdout.readline()``: readline on a text (or buffered) pipe reads what the
pipe holds into Python's buffer and returns one line of it. When the marker line came in the same write
as the line before it, it is then in that buffer, not in the pipe, and ``select`` on the pipe reports
nothing to read until the timeout. So wait_ready reads the pipe's file descriptor itself (``os.read``,
which returns what is there without waiting for more) into a buffer of its own and looks for the marker
there.
"""
import os
import select
import time

READ_BYTES = 1 << 16  # one pipe buffer's worth (Linux: 64 KiB) per read
POLL_S = 0.1  # how often the wait checks whether the process has exited (its stdout may be held open by a child)


def wait_ready(proc, marker, timeout_s):
    """Read ``proc``'s stdout until a line holds ``marker`` -> True; False if the process exits or closes its
    stdout first, or ``timeout_s`` passes. Returns as soon as the marker has arrived (its line's end need not
    have).

    proc: a subprocess.Popen with stdout=subprocess.PIPE, text or binary; wait_ready must be the first to read
    it. Whatever arrived in the same read as the marker, after it, is consumed here; later reads of
    ``proc.stdout`` go on from there. marker: a non-empty str without a newline."""
    if not isinstance(marker, str) or not marker or "\n" in marker:
        raise ValueError(f"marker must be a non-empty str without a newline, got {marker!r}")
    if proc.stdout is None:
        raise ValueError("proc has no stdout pipe: start it with stdout=subprocess.PIPE")
    needle = marker.encode(getattr(proc.stdout, "encoding", None) or "utf-8")
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    tail = b""  # the end of the current line, enough of it to hold all but the last byte of the marker
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        readable, _, _ = select.select([fd], [], [], min(left, POLL_S))
        if not readable:
            if proc.poll() is not None:  # exited, and the pipe holds nothing more
                return False
            continue
        chunk = os.read(fd, READ_BYTES)
        if not chunk:  # end of file: the process closed its stdout
            return False
        text = tail + chunk
        if needle in text:
            return True
        tail = text[max(text.rfind(b"\n") + 1, len(text) - len(needle) + 1):]
