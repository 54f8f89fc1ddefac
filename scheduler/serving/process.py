"""Child processes: the one launcher (``Child``), and waiting for a daemon to say it is ready.

Why not ``select`` plus ``proc.stdout.readline()``: readline on a text (or buffered) pipe reads what the
pipe holds into Python's buffer and returns one line of it. When the marker line came in the same write
as the line before it, it is then in that buffer, not in the pipe, and ``select`` on the pipe reports
nothing to read until the timeout. So wait_ready reads the pipe's file descriptor itself (``os.read``,
which returns what is there without waiting for more) into a buffer of its own and looks for the marker
there.

``Child`` is the one launcher for latentwire's child processes (the demo's cloud, the pool's workers,
bench's and the tests' daemons): it starts the child with the repository root kept off its ``sys.path``
(``cli_command``, ``child_env``), waits for its ready line, reports an early death at once with the last
lines of its stderr, and stops it.
"""
import collections
import os
import select
import signal
import subprocess
import sys
import threading
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


# ---- the one launcher ---------------------------------------------------------------------------------

READY_TIMEOUT_S = 120  # a daemon imports torch, diffusers and transformers, then loads its model
STOP_TIMEOUT_S = 30  # after SIGTERM a daemon finishes the sessions it holds, then exits; past this it is killed
TAIL_LINES = 40  # the lines of a dead child's stderr that its error quotes
EXIT_GRACE_S = 2.0  # after its stdout closes, how long a child is given to be reaped before it counts as alive
DRAIN_JOIN_S = 5.0  # after a child exits, how long stop() waits for its stdout reader to reach the end


def cli_command(*args):
    """``latentwire ARGS`` as this interpreter runs it in a child -> argv.

    ``-P`` keeps the working directory off the child's ``sys.path``: run from a source checkout, it would
    put the repository root there, whose ``kernels/`` then shadows Hugging Face's ``kernels`` that
    diffusers imports. (``latentwire``'s own import takes the root off too; ``-P`` also covers what runs
    before it.) Every process latentwire starts goes through here."""
    return [sys.executable, "-P", "-m", "latentwire.cli", *map(str, args)]


def child_env(env=None):
    """The environment for a child -> a dict: ``env`` (default: ours) with PYTHONSAFEPATH=1, so the child's
    own Python children (a pool's workers) keep the working directory off their path too."""
    return {**(os.environ if env is None else env), "PYTHONSAFEPATH": "1"}


class ChildFailed(RuntimeError):
    """A child exited, or stayed silent, before it said it was ready. ``returncode`` is None for a
    timeout; ``stderr_tail`` holds the last lines it wrote to stderr."""

    def __init__(self, message, returncode, stderr_tail):
        super().__init__(message)
        self.returncode, self.stderr_tail = returncode, stderr_tail


class Child(subprocess.Popen):
    """A child process that says on stdout when it is ready, as latentwire's daemons do.

    Its stdout is a text pipe for ``wait_ready``; afterwards the owner reads it (``drain``) or closes it.
    Its stderr goes to ``log`` (a path: the whole log stays readable there), or with ``log=None`` line by
    line to this process's stderr; either way ``stderr_tail()`` gives the last lines, which an early death
    is reported with. ``env`` (default: ours) gets PYTHONSAFEPATH=1 (``child_env``).

        cloud = Child(cli_command("cloud", "--bind", bind), log=path).wait_ready("serving")
        ...
        cloud.stop()
    """

    def __init__(self, cmd, *, log=None, env=None, cwd=None, name=None):
        self.name = name or " ".join(map(str, cmd[:6]))
        self.log_path = None if log is None else str(log)
        self._tail = collections.deque(maxlen=TAIL_LINES)
        self._drainer = None
        if self.log_path is None:
            super().__init__(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                             env=child_env(env), cwd=cwd)
            self._copier = threading.Thread(target=self._copy_stderr, name=f"stderr of {self.pid}", daemon=True)
            self._copier.start()
        else:
            with open(self.log_path, "ab") as stderr:
                super().__init__(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, errors="replace",
                                 env=child_env(env), cwd=cwd)
            self._copier = None

    def _copy_stderr(self):
        with self.stderr:
            for line in self.stderr:
                self._tail.append(line)
                sys.stderr.write(line)

    def stderr_tail(self, lines=TAIL_LINES):
        """The last ``lines`` lines the child wrote to stderr (so far) -> str."""
        if self.log_path is None:
            return "".join(list(self._tail)[-lines:])
        with open(self.log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(self.log_path) - 200 * lines))
            return b"".join(f.read().splitlines(keepends=True)[-lines:]).decode(errors="replace")

    def wait_ready(self, marker="serving", timeout_s=READY_TIMEOUT_S):
        """Wait until a stdout line holds ``marker`` -> self. A child that exits first is reported at once,
        one silent for ``timeout_s`` is killed; either raises ChildFailed with its last stderr lines."""
        if wait_ready(self, marker, timeout_s):
            return self
        try:
            code = self.wait(timeout=EXIT_GRACE_S)  # wait_ready also returns when the child closed its stdout
            what = f"exited with code {code} before it printed {marker!r}"
        except subprocess.TimeoutExpired:
            code, what = None, f"did not print {marker!r} within {timeout_s} s and was killed"
            self.kill()
            self.wait()
        if self._copier is not None:
            self._copier.join(timeout=EXIT_GRACE_S)  # the copy reaches the child's last line
        tail = self.stderr_tail()
        where = f" (the whole log: {self.log_path})" if self.log_path else ""
        self.stdout.close()
        raise ChildFailed(f"`{self.name}` {what}. The last lines of its stderr{where}:\n{tail}", code, tail)

    def drain(self, on_line):
        """Read the rest of stdout on a daemon thread, calling ``on_line(line)`` for each -> the thread. A
        pipe nobody reads fills up (64 KiB on Linux) and blocks the child's next print."""
        def read():
            with self.stdout:
                for line in self.stdout:
                    on_line(line)

        self._drainer = threading.Thread(target=read, name=f"stdout of {self.pid}", daemon=True)
        self._drainer.start()
        return self._drainer

    def stop(self, timeout_s=STOP_TIMEOUT_S):
        """SIGTERM, up to ``timeout_s`` to exit, then SIGKILL -> its exit code, once it is reaped."""
        if self.poll() is None:
            self.send_signal(signal.SIGTERM)
        try:
            code = self.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.wait()
        if self._drainer is None:
            self.stdout.close()
        else:  # it closes the pipe itself; a grandchild holding the pipe open must not hold up the stop
            self._drainer.join(timeout=DRAIN_JOIN_S)
        return code
