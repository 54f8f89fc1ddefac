"""Child processes as the daemons' parents run them: wait_ready (scheduler/serving/process.py) on real children, and a
worker pool (scheduler/serving/broker.py) whose worker prints far more than a pipe holds after its ready line."""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from latentwire.scheduler.serving.broker import Pool
from latentwire.scheduler.serving.process import Child, ChildFailed, child_env, cli_command, wait_ready

TIMEOUT_S = 20  # what a test gives wait_ready when it should answer long before
QUICK_S = 5  # "at once": well inside TIMEOUT_S, with room for a slow, shared machine
SILENT_TIMEOUT_S = 1.0


def child(code, **kw):
    """python -c CODE with its stdout a text pipe, as the daemons' parents start them."""
    return subprocess.Popen([sys.executable, "-P", "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
                            **kw)


@pytest.fixture
def procs():
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def timed(proc, marker, timeout_s):
    start = time.monotonic()
    ready = wait_ready(proc, marker, timeout_s)
    return ready, time.monotonic() - start


def test_the_marker_in_the_second_of_two_lines_sent_in_one_write(procs):
    # select + readline missed this one: readline buffered both lines, select then saw an empty pipe
    procs.append(child("""
        import os, time
        os.write(1, b"loading the model\\nlatentwire cloud: serving on ipc://x\\n")
        time.sleep(60)
    """))
    ready, took = timed(procs[-1], "serving", TIMEOUT_S)
    assert ready and took < QUICK_S


def test_the_marker_after_many_lines_in_one_write(procs):
    procs.append(child("""
        import os, time
        os.write(1, b"".join(b"line %d\\n" % i for i in range(10000)) + b"ready\\n")
        time.sleep(60)
    """))
    ready, took = timed(procs[-1], "ready", TIMEOUT_S)
    assert ready and took < QUICK_S


def test_the_marker_split_across_writes_and_before_its_line_ends(procs):
    procs.append(child("""
        import os, time
        os.write(1, b"starting\\nlatentwire cloud: ser")
        time.sleep(0.3)
        os.write(1, b"ving")    # the line's end never comes
        time.sleep(60)
    """))
    ready, took = timed(procs[-1], "serving", TIMEOUT_S)
    assert ready and took < QUICK_S


def test_a_marker_split_over_two_lines_is_not_a_match(procs):
    procs.append(child("""
        import os
        os.write(1, b"ser\\nving\\n")
    """))
    ready, took = timed(procs[-1], "serving", TIMEOUT_S)
    assert not ready and took < QUICK_S


def test_a_child_that_exits_without_the_marker(procs):
    procs.append(child("""
        print("cannot load the model")
        raise SystemExit(3)
    """))
    ready, took = timed(procs[-1], "serving", TIMEOUT_S)
    assert not ready and took < QUICK_S


def test_a_child_that_exits_while_its_own_child_holds_the_pipe(procs):
    # no end of file while the grandchild lives: the exit itself must end the wait
    procs.append(child("""
        import subprocess, sys
        subprocess.Popen([sys.executable, "-P", "-c", "import time; time.sleep(10)"])
    """))
    ready, took = timed(procs[-1], "serving", TIMEOUT_S)
    assert not ready and took < QUICK_S


def test_a_child_that_closes_its_stdout_and_lives_on(procs):
    procs.append(child("""
        import os, time
        os.write(1, b"no marker here\\n")
        os.close(1)
        time.sleep(60)
    """))
    ready, took = timed(procs[-1], "serving", TIMEOUT_S)
    assert not ready and took < QUICK_S


def test_a_silent_child_times_out(procs):
    procs.append(child("import time; time.sleep(60)"))
    ready, took = timed(procs[-1], "serving", SILENT_TIMEOUT_S)
    assert not ready and SILENT_TIMEOUT_S <= took < SILENT_TIMEOUT_S + QUICK_S
    assert procs[-1].poll() is None  # waiting does not touch the process


def test_a_binary_pipe(procs):
    procs.append(subprocess.Popen([sys.executable, "-P", "-c", "import os, time; os.write(1, b'a\\nready\\n'); "
                                   "time.sleep(60)"], stdout=subprocess.PIPE))
    ready, took = timed(procs[-1], "ready", TIMEOUT_S)
    assert ready and took < QUICK_S


def test_the_marker_must_be_one_line(procs):
    procs.append(child("pass"))
    for marker in ("", "two\nlines", b"bytes"):
        with pytest.raises(ValueError, match="marker must be"):
            wait_ready(procs[-1], marker, TIMEOUT_S)


# ---------------------------------------------------------------- the launcher: Child

def test_a_child_that_dies_before_it_is_ready_is_reported_at_once_with_its_stderr(tmp_path):
    code = "import sys; print('loading'); sys.stderr.write('step one\\nno model at /nowhere\\n'); sys.exit(3)"
    for log in (tmp_path / "child.log", None):  # its stderr in a file, or copied into ours
        child = Child([sys.executable, "-P", "-c", code], log=log, name="the test's cloud")
        start = time.monotonic()
        with pytest.raises(ChildFailed) as failed:
            child.wait_ready("serving", timeout_s=600)
        assert time.monotonic() - start < QUICK_S  # the exit ended the wait, not the 600 s
        assert failed.value.returncode == 3 and "no model at /nowhere" in failed.value.stderr_tail
        message = str(failed.value)
        assert "`the test's cloud` exited with code 3 before it printed 'serving'" in message
        assert "step one\nno model at /nowhere" in message
        assert child.stdout.closed


def test_a_silent_child_is_killed_and_reported_with_its_stderr(tmp_path):
    child = Child([sys.executable, "-P", "-c", "import sys, time; sys.stderr.write('stuck\\n'); sys.stderr.flush(); "
                   "time.sleep(60)"], log=tmp_path / "child.log")
    with pytest.raises(ChildFailed, match=r"did not print 'serving' within 1.0 s and was killed") as failed:
        child.wait_ready("serving", timeout_s=1.0)
    assert failed.value.returncode is None and failed.value.stderr_tail == "stuck\n"
    assert child.poll() == -signal.SIGKILL


def test_a_ready_child_is_stopped_by_sigterm_and_its_stderr_copied(capfd):
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
            "sys.stderr.write('a warning\\n'); print('serving', flush=True); time.sleep(60)")
    child = Child([sys.executable, "-P", "-c", code]).wait_ready("serving", TIMEOUT_S)
    assert child.stop(TIMEOUT_S) == 0 and child.stdout.closed
    child._copier.join(TIMEOUT_S)
    assert "a warning" in capfd.readouterr().err and child.stderr_tail() == "a warning\n"


def test_a_child_that_ignores_sigterm_is_killed_after_the_stop_timeout():
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('serving', flush=True); "
                "time.sleep(60)")
    child = Child([sys.executable, "-P", "-c", stubborn]).wait_ready("serving", TIMEOUT_S)  # SIGTERM ignored from here
    try:
        start = time.monotonic()
        assert child.stop(0.5) == -signal.SIGKILL
        assert time.monotonic() - start < QUICK_S and not os.path.exists(f"/proc/{child.pid}")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_children_keep_the_working_directory_off_their_path(tmp_path):
    # cli_command runs with -P; child_env passes PYTHONSAFEPATH=1 on to their own Python children
    assert cli_command("cloud", "--threads", 1)[:4] == [sys.executable, "-P", "-m", "latentwire.cli"]
    assert cli_command("cloud", "--threads", 1)[4:] == ["cloud", "--threads", "1"]
    show = "import json, os, sys; print(json.dumps([os.getcwd(), sys.path]))"
    run = subprocess.run([sys.executable, "-c", show], cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                         timeout=TIMEOUT_S, check=True)
    cwd, path = json.loads(run.stdout)
    assert "" not in path and cwd not in path


# ---------------------------------------------------------------- the pool drains its workers' stdout

CHATTY_LINES = 20_000  # 100 bytes each: 2 MB, 30 pipe buffers of 64 KiB
CHATTY_WORKER = """
import pathlib, sys, time
print("latentwire cloud: serving (fake worker)", flush=True)
for i in range({lines}):
    print(f"{{i:>8}} " + "x" * 91)
print("last line", flush=True)
pathlib.Path(sys.argv[1]).write_text("printed it all")
time.sleep(120)  # until the pool's SIGTERM
"""


class ChattyPool(Pool):
    """A pool whose workers are a script that prints CHATTY_LINES lines after its ready line, then writes
    ``done``."""

    def __init__(self, done, *args, **kw):
        super().__init__(*args, **kw)
        self.done = done

    def _command(self, slot):
        return [sys.executable, "-P", "-c", CHATTY_WORKER.format(lines=CHATTY_LINES), str(self.done)]


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        if record.getMessage() == "worker stdout":
            self.lines.append(record.fields["line"])


def test_a_worker_that_prints_a_lot_after_ready_is_not_blocked(tmp_path):
    done = tmp_path / "done"
    pool = ChattyPool(done, f"ipc://{tmp_path}/front.sock", 1, [])
    log = logging.getLogger("latentwire.broker")
    handler, level = Lines(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    ready = threading.Event()
    thread = threading.Thread(target=pool.serve_forever, kwargs={"on_ready": ready.set, "install_signals": False},
                              daemon=True)
    thread.start()
    try:
        assert ready.wait(TIMEOUT_S), "the fake worker's ready line was not seen"
        deadline = time.monotonic() + TIMEOUT_S
        while not done.exists() and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        assert done.exists(), "the worker blocked on a full stdout pipe"
        worker = pool.procs[0]
    finally:
        pool.stop()
        thread.join(TIMEOUT_S)
        log.removeHandler(handler)
        log.setLevel(level)
    assert not thread.is_alive() and worker.poll() is not None  # stopped, and the worker with it
    assert worker.stdout.closed and pool.restarts == 0
    # every line after the first read that held the ready line reached the pool's log, the last one too
    assert handler.lines[-1] == "last line" and len(handler.lines) > CHATTY_LINES // 2
