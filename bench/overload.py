"""Overload: 64 concurrent sessions against one `latentwire cloud` daemon, 16 of them `latentwire edge`
processes and the rest EdgeClient threads in a few processes, all started at once.

    .venv/bin/python bench/overload.py [--sessions 64] [--edge-processes 16] [--api-processes 3] [--steps 20]
                                       [--max-batch 16] [--max-sessions N] [--global-timeout 900] [--json]

One daemon (the embedded world models, `--max-batch 16`, one torch thread) serves tcp://127.0.0.1 on a
free port, as a real process. At the same moment this script starts E `latentwire edge --json` processes
(hybrid-sd, OMP_NUM_THREADS=1; one holds about 0.5 GB, so not all 64 can be) and P worker processes
(this script with --worker), each running its share of the other sessions as threads, one EdgeClient and
connection each, on one shared edge model with one torch thread. The workers load, say "ready", and are
told to go when the first CLI session reaches the daemon, so that both groups' sessions overlap. Every
edge gets heartbeat_timeout_s 5 and 2 retries: a request turned away as `busy` (--max-sessions) goes
again after 0.2 s, then 0.4 s, then the session fails with the daemon's reason.

Reported: sessions completed, errors by kind (a "went silent" while the daemon is alive is a bug: it beats
every --heartbeat seconds while a request is queued or running), requests sent beyond one a session,
`busy` refusals counted in the daemon's JSON log, stalls (the daemon seen alive but slow), p50/p99
session latency (generate(); for the CLI its own wall_s: generate, decode, save) for the CLI group, the
API group and all, the spread of the sessions' first admissions in the daemon's log, peak memory
(VmHWM) of the daemon, an edge process and a worker, and the wall time of the whole run.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import daemons  # noqa: E402  (the tests' daemon starter: real processes, logs to a file)

from PIL import Image  # noqa: E402

from latentwire.pipelines.world import IMAGE_SIZE, all_scenes, caption  # noqa: E402
from latentwire.scheduler.serving.process import wait_ready  # noqa: E402

CAPTIONS = [caption(s) for s in all_scenes()]  # "a red circle at the top left", the world's 48
GUIDANCE = 7.5  # `latentwire edge`'s default, so both groups run the same sessions
WORKER_READY_S = 300  # 16 edges and P workers import torch at once on 2 cores
GO_AFTER_S = 120  # the longest the workers wait for the first CLI session to reach the daemon
SAMPLE_S = 0.5  # how often memory is sampled
STOP_S = 30  # the daemon's SIGTERM grace before SIGKILL
SLOW = "alive but slow"
WORKER_ONLY = ("worker", "json", "endpoint", "first", "count", "deadline")  # flags no run reports
# error text -> kind: the edge's own messages (scheduler/serving/edge.py)
KINDS = (("went silent", "heartbeat (went silent)"), ("(--max-sessions)", "busy"), ("is stopping", "unavailable"),
         ("did not finish in time", "deadline"), ("no answer from the cloud", "timeout"),
         ("refused this edge", "handshake refused"), ("global timeout", "global timeout"),
         ("wrong result", "wrong result"))


def kind_of(error):
    for needle, kind in KINDS:
        if needle in error:
            return kind
    return "other"


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else None


def status_kb(pid, key):
    """/proc/PID/status's ``key`` (VmHWM, VmRSS) in kB, or None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None


def mem_available_kb():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])


# -- the worker: N sessions as threads of one process ---------------------------------------------------

def worker(args):
    import torch

    from latentwire.pipelines.embedded import EDGE_PATH
    from latentwire.pipelines.models.sd import StableDiffusionModel
    from latentwire.scheduler import SessionSpec, make
    from latentwire.scheduler.serving.edge import EdgeClient

    torch.set_num_threads(1)
    model = StableDiffusionModel.from_pretrained(str(EDGE_PATH))
    scheduler = model.make_scheduler()  # as cli.py's _edge builds its spec
    plan = make(args.plan, args.steps)
    indices = range(args.first, args.first + args.count)
    specs = [SessionSpec(prompt=CAPTIONS[i % len(CAPTIONS)], plan=plan, scheduler=type(scheduler).__name__,
                         scheduler_config=dict(scheduler.config), guidance_scale=GUIDANCE, seed=i) for i in indices]
    clients = [EdgeClient(args.endpoint, model, timeout_s=args.timeout, heartbeat_timeout_s=args.heartbeat_timeout,
                          retries=args.retries) for _ in specs]
    records = [{"group": "api", "index": i, "ok": False, "error": "global timeout: unfinished", "wall_s": None}
               for i in indices]
    barrier = threading.Barrier(len(specs))

    def one(k):
        client, r = clients[k], records[k]
        barrier.wait()
        t = time.perf_counter()
        try:
            latent, summary = client.generate(specs[k])
            r.update(ok=True, error=None, degraded=summary.degraded)
            if tuple(latent.shape) != (1, *model.latent_shape) or not torch.isfinite(latent).all():
                r.update(ok=False, error=f"wrong result: a latent of shape {tuple(latent.shape)}, finite "
                                        f"{bool(torch.isfinite(latent).all())}")
        except Exception as e:  # recorded, with its kind: an overload run must explain every failure
            r.update(error=f"{type(e).__name__}: {e}")
        r.update(wall_s=time.perf_counter() - t, requests=client.attempts, stalls=client.stalls,
                 session_id=client.session_id)

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(len(specs))]
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, args.deadline - time.time()))
    print(json.dumps(records), flush=True)
    os._exit(0)  # threads stuck past the deadline must not hold the exit


# -- the run -----------------------------------------------------------------------------------------------

def cli_record(i, proc, out, err, launched, ended):
    """One `latentwire edge` process's session, from its --json line (or its last words) and its image."""
    r = {"group": "cli", "index": i, "ok": False, "wall_s": None, "process_s": ended - launched,
         "stalls": err.count(SLOW)}
    if proc.returncode == 0:
        summary = json.loads(out.strip().splitlines()[-1])
        r.update(ok=True, error=None, wall_s=summary["wall_s"], requests=summary["requests_sent"],
                 degraded=summary["degraded"], session_id=summary["session_id"])
        with Image.open(summary["output"]) as image:
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                r.update(ok=False, error=f"wrong result: a {image.size} image, not {IMAGE_SIZE}x{IMAGE_SIZE}")
    else:
        said = [line for line in err.splitlines() if line.startswith("latentwire edge:") and SLOW not in line]
        r["error"] = said[-1] if said else f"exit code {proc.returncode}: {err.strip()[-300:]}"
    return r


def daemon_log(path):
    """The daemon's JSON lines -> (events by name, busy refusals, first admission time by session)."""
    events, busy, admitted = {}, 0, {}
    for line in Path(path).read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue  # diffusers' and transformers' own notices
        if not isinstance(e, dict) or "event" not in e:
            continue
        events[e["event"]] = events.get(e["event"], 0) + 1
        busy += e["event"] == "refused" and e.get("code") == "busy"
        if e["event"] == "admitted":
            ts = datetime.strptime(e["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
            admitted.setdefault(e.get("session"), ts)
    return events, busy, admitted


def run(args):
    t_run = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="latentwire-overload-"))
    endpoint = f"tcp://127.0.0.1:{daemons.free_port()}"
    max_sessions = args.max_sessions or max(256, args.sessions)
    n_cli = min(args.edge_processes, args.sessions)
    n_api = args.sessions - n_cli
    note = lambda text: print(f"[{time.monotonic() - t_run:6.1f} s] {text}", file=sys.stderr, flush=True)  # noqa: E731
    cloud = daemons.start("cloud", "--bind", endpoint, "--max-batch", str(args.max_batch), "--max-wait-ms",
                          str(args.max_wait_ms), "--threads", str(args.cloud_threads), "--heartbeat",
                          str(args.heartbeat), "--max-sessions", str(max_sessions), "--max-sessions-per-client",
                          str(max_sessions), same_threads=False)
    note(f"daemon {cloud.pid} serving on {endpoint} (log {cloud.log_path})")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    edge_flags = ["--heartbeat-timeout", str(args.heartbeat_timeout), "--retries", str(args.retries),
                  "--timeout", str(args.timeout)]
    t0 = time.time()
    deadline = t0 + args.global_timeout
    share = [n_api // args.api_processes + (w < n_api % args.api_processes) for w in range(args.api_processes)]
    workers, first = [], n_cli  # workers: (process, first session index, sessions)
    for count in (c for c in share if c):
        cmd = [sys.executable, __file__, "--worker", "--endpoint", endpoint, "--first", str(first), "--count",
               str(count), "--deadline", str(deadline), "--plan", args.plan, "--steps", str(args.steps), *edge_flags]
        log = open(root / f"worker-{first}.log", "w")
        workers.append((subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env=env), first, count))
        first += count
    edges = []
    for i in range(n_cli):
        cmd = [daemons.CLI, "edge", "--connect", endpoint, "--json", "--plan", args.plan, "--steps", str(args.steps),
               "--prompt", CAPTIONS[i % len(CAPTIONS)], "--seed", str(i), "--guidance", str(GUIDANCE),
               "--out", str(root / f"{i}.png"), *edge_flags]
        out, err = open(root / f"edge-{i}.out", "w+"), open(root / f"edge-{i}.err", "w+")
        edges.append((subprocess.Popen(cmd, stdout=out, stderr=err, env=env), out, err))
    launched = time.monotonic()
    note(f"started {n_cli} `latentwire edge` processes and {len(workers)} workers ({n_api} sessions)")

    peaks, lowest_available, sampling = {}, [mem_available_kb()], threading.Event()

    def sample():  # peak resident memory of each process we started, and the machine's least free memory
        pids = {"cloud": [cloud.pid], "edge": [p.pid for p, _, _ in edges], "worker": [w.pid for w, _, _ in workers]}
        while not sampling.wait(SAMPLE_S):
            for group, ps in pids.items():
                for pid in ps:
                    hwm = status_kb(pid, "VmHWM")
                    if hwm is not None:
                        peaks[pid] = (group, max(hwm, peaks.get(pid, (group, 0))[1]))
            lowest_available[0] = min(lowest_available[0], mem_available_kb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    records, cloud_died_at = [], None
    try:
        ready = [wait_ready(w, "ready", max(1.0, min(WORKER_READY_S, deadline - time.time()))) for w, _, _ in workers]
        note(f"workers ready: {sum(ready)}/{len(workers)}")
        go_by = time.monotonic() + GO_AFTER_S
        while n_cli and not daemon_log(cloud.log_path)[2] and time.monotonic() < go_by:
            time.sleep(0.05)
        t_go = time.time()
        for w, _, _ in workers:
            try:
                w.stdin.write("go\n")
                w.stdin.flush()
            except OSError:
                pass  # a worker that died is reported below
        note("workers told to go")
        pending = dict(enumerate(edges))
        while pending and time.time() < deadline:
            for i, (p, out, err) in list(pending.items()):
                if p.poll() is not None:
                    ended = time.monotonic()
                    out.seek(0)
                    err.seek(0)
                    records.append(cli_record(i, p, out.read(), err.read(), launched, ended))
                    del pending[i]
            if cloud_died_at is None and cloud.poll() is not None:
                cloud_died_at = time.time() - t0
            time.sleep(0.05)
        for i, (p, _, _) in pending.items():
            p.kill()
            p.wait()
            records.append({"group": "cli", "index": i, "ok": False, "error": "global timeout: killed",
                            "wall_s": None, "stalls": 0})
        note(f"edge processes done: {n_cli - len(pending)}/{n_cli} exited by themselves")
        for w, first, count in workers:
            try:
                out, _ = w.communicate(timeout=max(1.0, deadline - time.time()) + 30)
                records += json.loads(out.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                w.kill()
                w.wait()
                tail = Path(root / f"worker-{first}.log").read_text()[-300:]
                records += [{"group": "api", "index": i, "ok": False, "wall_s": None, "stalls": 0,
                             "error": f"worker exited with code {w.returncode}: {tail}"}
                            for i in range(first, first + count)]
        if cloud_died_at is None and cloud.poll() is not None:
            cloud_died_at = time.time() - t0
        cloud_hwm = status_kb(cloud.pid, "VmHWM")
    finally:
        sampling.set()
        for p, _, _ in edges:
            if p.poll() is None:
                p.kill()
                p.wait()
        for w, _, _ in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        code = daemons.stop(cloud, timeout=STOP_S)
    events, busy, admitted = daemon_log(cloud.log_path)
    ours = [admitted[r["session_id"]] for r in records if r.get("session_id") in admitted]
    for r in records:  # when the daemon first admitted it, from its first admission of any session
        if r.get("session_id") in admitted:
            r["admitted_s"] = round(admitted[r["session_id"]] - min(ours), 3)
    return report(args, records, dict(
        endpoint=endpoint, max_sessions=max_sessions, cloud_exit_code=code, cloud_died_at_s=cloud_died_at,
        daemon_events=events, busy_refusals=busy, cloud_peak_rss_mb=cloud_hwm and round(cloud_hwm / 1024, 1),
        peak_rss_mb={g: round(max((kb for grp, kb in peaks.values() if grp == g), default=0) / 1024, 1)
                     for g in ("edge", "worker")},
        machine_least_available_gb=round(lowest_available[0] / 2**20, 2),
        admission_spread_s=round(max(ours) - min(ours), 2) if ours else None,
        go_after_launch_s=round(t_go - t0, 1), wall_s=round(time.monotonic() - t_run, 1),
        logs=str(root), daemon_log=cloud.log_path))


def group_row(name, rs):
    walls = [r["wall_s"] for r in rs if r["ok"]]
    known = [r["requests"] for r in rs if r.get("requests") is not None]
    return {"group": name, "sessions": len(rs), "completed": len(walls), "errors": len(rs) - len(walls),
            "requests_sent": sum(known), "requests_unknown": len(rs) - len(known),
            "retries": sum(known) - len(known), "stalls": sum(r.get("stalls") or 0 for r in rs),
            "degraded": sum(bool(r.get("degraded")) for r in rs),
            "p50_s": pct(walls, 50), "p99_s": pct(walls, 99), "max_s": max(walls, default=None),
            "admitted_p50_s": pct([r["admitted_s"] for r in rs if "admitted_s" in r], 50)}


def report(args, records, daemon):
    records.sort(key=lambda r: r["index"])
    rows = [group_row("cli (`latentwire edge`)", [r for r in records if r["group"] == "cli"]),
            group_row("api (EdgeClient threads)", [r for r in records if r["group"] == "api"]),
            group_row("all", records)]
    errors = {}
    for r in records:
        if not r["ok"]:
            errors.setdefault(kind_of(r["error"]), []).append(r)
    result = {"config": {k: v for k, v in vars(args).items() if k not in WORKER_ONLY},
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
              "groups": rows, "errors_by_kind": {k: len(v) for k, v in errors.items()},
              "error_examples": {k: v[0]["error"] for k, v in errors.items()},
              "silent_while_cloud_alive": sum(1 for r in errors.get("heartbeat (went silent)", [])
                                              if daemon["cloud_died_at_s"] is None),
              # the requirement: every session completes, or fails only for `busy` after its retries
              "met": all(kind == "busy" for kind in errors) and daemon["cloud_died_at_s"] is None,
              **daemon, "sessions": records}
    if args.json:
        print(json.dumps(result))
        return result
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"# overload: {args.sessions} sessions ({rows[0]['sessions']} `latentwire edge` processes, "
          f"{rows[1]['sessions']} EdgeClient threads in {args.api_processes} processes), {args.plan} {args.steps} "
          f"steps, daemon max-batch {args.max_batch} max-sessions {daemon['max_sessions']} threads "
          f"{args.cloud_threads}; heartbeat {args.heartbeat:g} s, edge heartbeat timeout {args.heartbeat_timeout:g} s, "
          f"retries {args.retries}; {os.cpu_count()} cpus")
    print("| group | completed | errors | requests sent | retries | stalls | p50 s | p99 s | max s | admitted at, p50 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        unknown = f" (+{r['requests_unknown']} unknown)" if r["requests_unknown"] else ""
        print(f"| {r['group']} | {r['completed']}/{r['sessions']} | {r['errors']} | {r['requests_sent']}{unknown} | "
              f"{r['retries']} | {r['stalls']} | {f(r['p50_s'])} | {f(r['p99_s'])} | {f(r['max_s'])} | "
              f"{f(r['admitted_p50_s'])} |")
    print(f"errors by kind: {result['errors_by_kind'] or 'none'}")
    for kind, text in result["error_examples"].items():
        print(f"  {kind}, e.g.: {text}")
    print(f"went silent while the cloud was alive: {result['silent_while_cloud_alive']}; cloud "
          f"{'alive throughout' if daemon['cloud_died_at_s'] is None else 'died at %.1f s' % daemon['cloud_died_at_s']}"
          f", exit code {daemon['cloud_exit_code']} after SIGTERM")
    events = daemon["daemon_events"]
    print(f"daemon log: {events}; busy refusals {daemon['busy_refusals']}; requests it received (admitted + "
          f"refused): {events.get('admitted', 0) + events.get('refused', 0)}")
    print(f"first admissions of the sessions spread over {f(daemon['admission_spread_s'])} s; workers told to go "
          f"{daemon['go_after_launch_s']} s after launch")
    print(f"peak RSS: daemon {daemon['cloud_peak_rss_mb']} MB, an edge process {daemon['peak_rss_mb']['edge']} MB, "
          f"a worker {daemon['peak_rss_mb']['worker']} MB; least memory available {daemon['machine_least_available_gb']} "
          f"GB; load average at the end {result['machine']['load_average_1m_at_end']}")
    print(f"whole run: {daemon['wall_s']} s (logs in {daemon['logs']})")
    print(f"every session completed, or failed only for `busy` after {args.retries} retries: "
          f"{'yes' if result['met'] else 'NO'}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--edge-processes", type=int, default=16, help="sessions run as `latentwire edge` processes")
    ap.add_argument("--api-processes", type=int, default=3, help="processes the other sessions share, as threads")
    ap.add_argument("--plan", default="hybrid-sd")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-sessions", type=int, default=0,
                    help="the daemon's --max-sessions (0: max(256, --sessions), all admitted); fewer: `busy` + retry")
    ap.add_argument("--cloud-threads", type=int, default=1, help="the daemon's torch threads")
    ap.add_argument("--heartbeat", type=float, default=1.0, help="the daemon's seconds between heartbeats")
    ap.add_argument("--heartbeat-timeout", type=float, default=5.0, help="each edge's heartbeat_timeout_s")
    ap.add_argument("--retries", type=int, default=2, help="each edge's retries")
    ap.add_argument("--timeout", type=float, default=600.0, help="each edge's timeout_s for a request")
    ap.add_argument("--global-timeout", type=float, default=900.0, help="seconds for the whole run")
    ap.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name, kind in (("--endpoint", str), ("--first", int), ("--count", int), ("--deadline", float)):
        ap.add_argument(name, type=kind, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if not 0 <= args.edge_processes <= args.sessions or args.api_processes < 1:
        ap.error(f"need 0 <= --edge-processes <= --sessions and --api-processes >= 1, got {args.edge_processes}, "
                 f"{args.sessions}, {args.api_processes}")
    result = run(args)
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
