"""`latentwire ARGS` in this process: ``run_cli`` calls ``latentwire.cli.main`` as the console script does,
and answers like ``subprocess.run(..., capture_output=True, text=True)``, without the 5 to 8 s a new
interpreter spends importing torch, diffusers and transformers.

What a child process would keep to itself is restored afterwards: torch's thread count (``--threads``),
the root logger's handlers and level, and the signal handlers. A command that exits (SystemExit) answers
its code, with a message on stderr as Python prints it; an uncaught exception answers 1 with its
traceback on stderr, as an interpreter would. Tests where the process itself is the point (a daemon's
signals, the console script, CURVE across processes, Ray) start real ones (daemons.py)."""
import contextlib
import io
import logging
import signal
import subprocess
import sys
import traceback

import torch

from latentwire.cli import main

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_cli(*args, stdin=""):
    """Run ``latentwire ARGS`` in this process -> CompletedProcess(args, returncode, stdout, stderr)."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    threads, root = torch.get_num_threads(), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    handlers_before = {s: signal.getsignal(s) for s in SIGNALS}
    stdin_before = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv) or 0
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - what an interpreter does with it: the traceback, then exit 1
                traceback.print_exc()
                code = 1
    finally:
        sys.stdin = stdin_before
        torch.set_num_threads(threads)
        root.handlers[:] = handlers
        root.setLevel(level)
        for s, handler in handlers_before.items():
            signal.signal(s, handler)
    return subprocess.CompletedProcess(["latentwire", *argv], code, out.getvalue(), err.getvalue())
