"""Cost model vs reality on loopback: every built-in plan on a model pair (the embedded world models, or tiny
random UNets at real latent sizes), a real `latentwire cloud` daemon on tcp://127.0.0.1, measured wall time
against scheduler.cost.model.predict with this machine's profiles.

    .venv/bin/python bench/cost_check.py [--models world|tiny-sd|tiny-sdxl] [--image-size PX] [--repeats 5]
                                         [--steps 20] [--guidance 3] [--profile-repeats 20] [--pairs 15]
                                         [--no-in-process] [--no-reprofile] [--json FILE]

--models: world (default): the embedded world models, latent 4x8x8, where compute dominates and the
messages are about a kilobyte; tiny-sd / tiny-sdxl: pipelines/models/tiny.py's and tiny_sdxl.py's random
pairs saved at --image-size (default 512 / 1024: SD v1.5's latent 4x64x64 and SDXL's 4x128x128), so that the
wire carries the bytes of real models' latents and solver state while compute stays cheap.

1. Profiles: `latentwire profile --model CLOUD|EDGE --threads 1 --side cloud|edge` (the real CLI, a process of its
   own) into a temp folder; the `loopback` link: the median round trip of a 64-byte ZeroMQ message
   (DEALER -> ROUTER echo in another process, tcp://127.0.0.1) as its RTT, and the throughput of a large
   message (the round trip of BIG_BYTES less the small RTT, both ways) as its bandwidth, written as a link
   profile.
2. One `latentwire cloud --threads 1` daemon (the embedded cloud model, defaults otherwise: max-batch 1, no
   previews) on tcp://127.0.0.1. This process is the edge: the embedded edge model, loaded once, one torch
   thread. For each plan (default parameters, the folders' scheduler, guidance 3), sessions run one
   at a time, the plans taking turns round by round (one warm-up round first, not counted): a fresh
   EdgeClient, then the timed part, generate(spec) and model.decode(latent) (the edge's VAE decode to a PIL
   image), which is what predict's latency_s covers (its parts: text encoding on each side used, every
   step of each side, forecast steps, transfer up and down, one RTT per cloud request, queue (0 here),
   the edge's decode). Every session has a prompt (and negative prompt) of its own, so that the cloud's
   prompt cache never hits: the model counts the cloud's text encoding once per session.
   With --in-process (default) the same session also runs in this process with both models and no wire
   (executor.run_plan + decode): the split of the gap between wire/daemon and the step loop itself.
3. predict(plan, cloud, edge, loopback, session=<the spec sent>, spaces=<the models' own>) per session; the
   table: measured median vs predicted, the ratio, whether it is within 15%, the spread of the repeats,
   bytes measured (EdgeClient's counters) against predicted, and the gap per cloud request. With
   --reprofile (default) the profiles are measured again after the sessions, to show the machine's drift;
   the edge's steps are also timed inside the sessions (EdgeClient's on_step) against the profile's figure.
4. The terms predict leaves out, each measured on its own in --pairs interleaved pairs (with the in-process
   run): the edge's per-session setup (scheduler + FusedSampler), one cloud request's wire and daemon
   overhead (a 1-step cloud-only session through the daemon less the same in-process), generate()'s socket
   without a request, the step loop's own cost per step on each side, the decode after a session against
   the profile's warm one; then predicted plus these terms against measured.
The script changes nothing: predict is called as it is, and what it misses is printed, not patched in.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import daemons  # noqa: E402  (the tests' daemon starter: real processes, logs to a file)

from latentwire.kernels import FusedSampler  # noqa: E402
from latentwire.pipelines import world  # noqa: E402
from latentwire.pipelines.embedded import CLOUD_PATH, EDGE_PATH  # noqa: E402
from latentwire.pipelines.models import load_model  # noqa: E402
from latentwire.protocol import wire_bytes  # noqa: E402
from latentwire.scheduler import SessionSpec, make, wire  # noqa: E402
from latentwire.scheduler.cost.model import TYPICAL_PID, predict  # noqa: E402
from latentwire.scheduler.cost.profiles import load_device, load_link  # noqa: E402
from latentwire.scheduler.executor import initial_noise, model_device, run_plan, stretches  # noqa: E402
from latentwire.scheduler.segments import SegmentRun, drive  # noqa: E402
from latentwire.scheduler.serving.edge import EdgeClient  # noqa: E402

PLANS = ("cloud-only", "edge-only", "hybrid-sd", "ec-diff", "preview-refine")  # each with its defaults
TOLERANCE = 0.15
CLI = str(Path(sys.executable).with_name("latentwire"))
SMALL_BYTES = 64
BIG_BYTES = 32 << 20
RTT_ROUNDS, RTT_WARMUP = 500, 50
BIG_ROUNDS, BIG_WARMUP = 7, 2
IDLE_S = 0.2  # how long a side waits, idle, in these sessions: about one cloud stretch
TIMEOUT_S = 120.0  # EdgeClient's default: its deadline (118 s) is the one the model's Run carries
# the loopback echo: a ROUTER that sends every message back as it came (copy=False: no Python copy)
ECHO = """
import sys
import zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.linger = 0
print(s.bind_to_random_port(sys.argv[1]), flush=True)
while True:
    s.send_multipart(s.recv_multipart(copy=False), copy=False)
"""


# -- 1. profiles ---------------------------------------------------------------------------------------------

def profile(folder, out, repeats, steps, side):
    """`latentwire profile --side SIDE` of a model folder -> the profile's path (the CLI's own process, one
    thread; side: as the daemon (cloud) or this process (edge) will run the model)."""
    cmd = [CLI, "profile", "--model", str(folder), "--out", str(out), "--threads", "1", "--repeats", str(repeats),
           "--steps", str(steps), "--side", side]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return Path(out)


def echo_round_trips(host, sizes, prefix=()):
    """Round trips (seconds) of messages echoed by a ROUTER in another process (started with ``prefix``:
    ``ip netns exec NAME`` puts it in a namespace) bound on ``host`` -> {size: [seconds]}. sizes: (bytes,
    rounds, warm-up rounds) each; the warm-up rounds are not returned."""
    echo = subprocess.Popen([*prefix, sys.executable, "-P", "-c", ECHO, f"tcp://{host}"], stdout=subprocess.PIPE,
                            text=True)
    try:
        port = int(echo.stdout.readline())
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(f"tcp://{host}:{port}")
        out = {}
        for size, rounds, warmup in sizes:
            payload, times = bytes(size), []
            for _ in range(warmup + rounds):
                start = time.perf_counter()
                sock.send(payload, copy=False)
                sock.recv(copy=False)
                times.append(time.perf_counter() - start)
            out[size] = times[warmup:]
        sock.close()
        ctx.term()
        return out
    finally:
        echo.kill()  # the echo process this function started
        echo.wait()


def measure_loopback(out):
    """The loopback link as ZeroMQ sees it -> (link profile path, details dict)."""
    trips = echo_round_trips("127.0.0.1", [(SMALL_BYTES, RTT_ROUNDS, RTT_WARMUP), (BIG_BYTES, BIG_ROUNDS, BIG_WARMUP)])
    rtts = trips[SMALL_BYTES]
    rtt, big_s = statistics.median(rtts), statistics.median(trips[BIG_BYTES])
    mbit_s = 2 * 8 * BIG_BYTES / max(big_s - rtt, 1e-9) / 1e6  # up and back, the small RTT taken out
    how = (f"measured here by bench/cost_check.py: pyzmq {zmq.__version__} DEALER -> ROUTER echo (another "
           f"process) over tcp://127.0.0.1")
    link = {"name": "loopback", "up_mbit_s": round(mbit_s, 1), "down_mbit_s": round(mbit_s, 1),
            "rtt_ms": rtt * 1e3,
            "sources": {"up_mbit_s": f"{how}: 2 x {BIG_BYTES} bytes / (median round trip of a {BIG_BYTES}-byte message "
                                     f"over {BIG_ROUNDS} rounds - the small RTT)",
                        "down_mbit_s": "the same measurement (loopback is symmetric)",
                        "rtt_ms": f"{how}: median round trip of a {SMALL_BYTES}-byte message over {RTT_ROUNDS} rounds"}}
    Path(out).write_text(json.dumps(link, indent=2))
    details = {"rtt_ms_median": rtt * 1e3, "rtt_ms_p10": pct(rtts, 10) * 1e3, "rtt_ms_p90": pct(rtts, 90) * 1e3,
               "big_bytes": BIG_BYTES, "big_round_trip_ms": big_s * 1e3, "mbit_s": mbit_s}
    return Path(out), details


# -- the model pair -----------------------------------------------------------------------------------------

MODELS = {"world": None, "tiny-sd": 512, "tiny-sdxl": 1024}  # -> the default image side (world: its own)


def model_pair(kind, image_size, folder):
    """(cloud folder, edge folder, what they are, in words) for --models ``kind``; tiny pairs are saved
    under ``folder``."""
    if kind == "world":
        if image_size is not None:
            raise SystemExit("--image-size: the world models have their own size (latent 4x8x8); give --models "
                             "tiny-sd or tiny-sdxl to choose one")
        return CLOUD_PATH, EDGE_PATH, "the embedded world models (latent 4x8x8)"
    from latentwire.pipelines.models.tiny import save_tiny_pair
    from latentwire.pipelines.models.tiny_sdxl import save_tiny_sdxl_pair

    size = MODELS[kind] if image_size is None else image_size
    save = save_tiny_pair if kind == "tiny-sd" else save_tiny_sdxl_pair
    cloud, edge = save(str(Path(folder) / kind), image_size=size)
    module = "tiny.py" if kind == "tiny-sd" else "tiny_sdxl.py"
    return Path(cloud), Path(edge), (f"{kind}: random tiny UNets at {size}x{size} (latent 4x{size // 8}x{size // 8}), "
                                     f"pipelines/models/{module}")


# -- 2. sessions ---------------------------------------------------------------------------------------------

CAPTIONS = [world.caption(s) for s in world.all_scenes()]
NEGATIVES = [""] + [f"{c} {s}" for c in world.COLOURS for s in world.SHAPES]


def prompt_for(n):
    """Session n's (prompt, negative prompt): no two sessions share both, so the cloud's cache never hits."""
    return CAPTIONS[n % len(CAPTIONS)], NEGATIVES[(n // len(CAPTIONS)) % len(NEGATIVES)]


def spec_for(model, plan, n, guidance):
    scheduler = model.make_scheduler()  # the folder's own: DDIM (world, tiny-sd), Euler (tiny-sdxl)
    prompt, negative = prompt_for(n)
    return SessionSpec(prompt=prompt, negative_prompt=negative, plan=plan, scheduler=type(scheduler).__name__,
                       scheduler_config=dict(scheduler.config), guidance_scale=guidance, seed=n)


def split_session(endpoint, edge, spec, **client):
    """One session through the daemon -> record (seconds, bytes, calls). client: more EdgeClient arguments
    (an emulated link, CURVE keys)."""
    marks = []  # when each edge step ended: the steps' own pace inside a real session
    client = EdgeClient(endpoint, edge, timeout_s=TIMEOUT_S, on_step=lambda i, real: marks.append(time.perf_counter()),
                        **client)
    start = time.perf_counter()
    latent, summary = client.generate(spec)
    generated = time.perf_counter()
    edge.decode(latent)
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(marks, marks[1:])]  # step 2 on: one step each (step 1 holds the text encoding)
    return {"wall_s": end - start, "generate_s": generated - start, "decode_s": end - generated,
            "edge_first_step_s": gaps[0] if gaps else None,
            "edge_step_s": statistics.median(gaps[1:]) if len(gaps) > 1 else None,
            "bytes_up": client.bytes_up, "bytes_down": client.bytes_down, "requests": client.attempts,
            "cloud_calls": summary.cloud_model_calls, "edge_calls": summary.edge_model_calls,
            "forecasts": summary.forecast_steps}


def local_session(models, spec):
    """The same session in this process, both models, no wire -> seconds (run_plan + decode)."""
    start = time.perf_counter()
    latent, _ = run_plan(spec, models)
    models["edge"].decode(latent)
    return time.perf_counter() - start


# -- what the model leaves out, measured directly ------------------------------------------------------------

def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def loop_overhead(model, spec, pairs):
    """Seconds per step that the step loop (drive: SegmentRun, Stepper, the forecaster's bookkeeping) adds
    to the calls a profile times (model.predict and FusedSampler.step) -> [per pair], interleaved pairs."""
    sched = spec.make_scheduler()
    sampler = FusedSampler(sched, device=model_device(model))
    cond = model.encode_prompt(spec.prompt, spec.negative_prompt)
    x0 = initial_noise(model, spec.seed, sched)
    n, g = spec.plan.num_steps, spec.guidance_scale

    def loop():
        drive(SegmentRun(spec, spec.plan.segments, sampler, cond, x0), model)

    def calls():
        for i in range(n):
            pc, pu = model.predict(x0, sampler.timesteps[i], *cond, scheduler=sched, guidance=g)
            sampler.step(x0, i, cond=pc, uncond=pu, guidance_scale=g)

    loop(), calls()
    pairs = [(timed(loop), timed(calls)) for _ in range(pairs)]
    return [(a - b) / n for a, b in pairs], [b / n for _, b in pairs]


def overheads(endpoint, models, guidance, steps, pairs, first):
    """The terms predict leaves out, each measured on its own (seconds; lists over ``pairs``)."""
    edge, n = models["edge"], first
    out = {"setup": [], "request": [], "socket": []}
    plan1 = make("cloud-only", 1)
    for _ in range(pairs):
        spec = spec_for(edge, plan1, n, guidance)
        n += 1
        # the session's own setup on the edge: generate() builds the scheduler and its sampler each time
        out["setup"].append(timed(lambda: FusedSampler(spec.make_scheduler(), device=model_device(edge))))
        # one cloud request of one step through the daemon against the same in this process
        split = timed(lambda: EdgeClient(endpoint, edge, timeout_s=TIMEOUT_S).generate(spec))
        out["request"].append(split - timed(lambda: run_plan(spec, models)))
    eo = make("edge-only", steps)
    for _ in range(pairs):  # generate() opens (and closes) its socket even when no request goes out
        spec = spec_for(edge, eo, n, guidance)
        n += 1
        out["socket"].append(timed(lambda: EdgeClient(endpoint, edge, timeout_s=TIMEOUT_S).generate(spec))
                             - timed(lambda: run_plan(spec, models)))
    for side, name in (("edge", "edge-only"), ("cloud", "cloud-only")):
        out[f"loop_{side}"], out[f"step_{side}"] = loop_overhead(models[side], spec_for(edge, make(name, steps), n,
                                                                                      guidance), pairs)
        n += 1
    out.update(wake_costs(models, spec_for(edge, make("cloud-only", steps), n, guidance), pairs))
    return out


def wake_costs(models, spec, pairs, idle_s=IDLE_S):
    """What a side pays to resume after waiting (the edge while the cloud computes, the daemon between
    requests): a process that slept idle_s runs its next calls slower than back-to-back calls, which is how
    a profile times them. -> lists (seconds) over pairs: wake_<side> (text encoding + 2 steps after the
    sleep, less the same right after the same), decode_after_steps (the edge's decode right after its
    UNet steps, less a decode right after a decode) and wake_decode (a decode after the sleep, less the same)."""
    edge = models["edge"]
    sched = spec.make_scheduler()
    ts = sched.timesteps
    x = initial_noise(edge, spec.seed, sched)
    out = {"wake_edge": [], "wake_cloud": [], "decode_after_steps": [], "wake_decode": []}

    def resume(m):
        c = m.encode_prompt(spec.prompt, spec.negative_prompt)
        m.predict(x, ts[0], *c, scheduler=sched)
        m.predict(x, ts[1], *c, scheduler=sched)

    def steps(m, k=8):
        c = m.encode_prompt(spec.prompt, spec.negative_prompt)
        for i in range(k):
            m.predict(x, ts[i], *c, scheduler=sched)

    def decode():
        edge.decode(x)

    for _ in range(pairs):
        for side in ("edge", "cloud"):
            m = models[side]
            resume(m)
            warm = timed(lambda: resume(m))
            time.sleep(idle_s)
            out[f"wake_{side}"].append(timed(lambda: resume(m)) - warm)
        decode()
        warm = timed(decode)
        steps(edge)
        out["decode_after_steps"].append(timed(decode) - warm)
        time.sleep(idle_s)
        out["wake_decode"].append(timed(decode) - warm)
    return out


# -- 3. report -----------------------------------------------------------------------------------------------

def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def ms(s):
    return f"{1e3 * s:.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", choices=sorted(MODELS), default="world",
                    help="the model pair (tiny-*: random UNets at real latent sizes)")
    ap.add_argument("--image-size", type=int, help="tiny-* pairs: the image side in pixels (default 512 / 1024)")
    ap.add_argument("--repeats", type=int, default=5, help="timed sessions per plan (after one warm-up round)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--profile-repeats", type=int, default=20, help="`latentwire profile --repeats`")
    ap.add_argument("--no-in-process", dest="in_process", action="store_false",
                    help="skip the one-process run of each session (no wire)")
    ap.add_argument("--no-reprofile", dest="reprofile", action="store_false",
                    help="skip measuring the profiles again after the sessions")
    ap.add_argument("--pairs", type=int, default=15, help="interleaved pairs per directly measured missing term "
                                                            "(0: skip; needs the in-process run)")
    ap.add_argument("--json", help="also write every measured row and prediction here")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.profile_repeats < 1 or args.pairs < 0:
        ap.error("--repeats, --steps and --profile-repeats must be >= 1, --pairs >= 0")
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    t_run = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="latentwire-cost-check-"))
    cloud_dir, edge_dir, described = model_pair(args.models, args.image_size, tmp)
    cloud_path = profile(cloud_dir, tmp / "cloud.json", args.profile_repeats, args.steps, "cloud")
    edge_path = profile(edge_dir, tmp / "edge.json", args.profile_repeats, args.steps, "edge")
    link_path, link_details = measure_loopback(tmp / "loopback.json")
    cloud_p, edge_p, link = load_device(cloud_path), load_device(edge_path), load_link(link_path)

    edge = load_model(str(edge_dir))
    models = {"edge": edge}
    if args.in_process:
        models["cloud"] = load_model(str(cloud_dir))
    plans = {name: make(name, args.steps) for name in PLANS}
    spaces = (wire.plain(edge.latent_space), wire.plain(edge.text_space))
    endpoint = f"tcp://127.0.0.1:{daemons.free_port()}"
    proc = daemons.start("cloud", "--bind", endpoint, "--model", str(cloud_dir), "--threads", "1",
                         same_threads=False)
    rows = {name: [] for name in PLANS}
    n = 0
    try:
        for r in range(1 + args.repeats):  # round 0: warm-up (lazy initialisation on both sides)
            for name in PLANS:
                spec = spec_for(edge, plans[name], n, args.guidance)
                n += 1
                row = split_session(endpoint, edge, spec)
                if args.in_process:
                    row["local_s"] = local_session(models, spec)
                cost = predict(plans[name], cloud_p, edge_p, link, session=spec, spaces=spaces)
                row.update(predicted_s=cost.latency_s, predicted_up=cost.bytes_up, predicted_down=cost.bytes_down,
                           predicted_requests=cost.requests, parts=dict(cost.parts), round=r)
                if r:
                    rows[name].append(row)
        terms = overheads(endpoint, models, args.guidance, args.steps, args.pairs, n) if (
            args.in_process and args.pairs) else None
    finally:
        code = daemons.stop(proc)
    after = {}
    if args.reprofile:
        after_cloud = load_device(profile(cloud_dir, tmp / "cloud-after.json", args.profile_repeats, args.steps,
                                        "cloud"))
        after_edge = load_device(profile(edge_dir, tmp / "edge-after.json", args.profile_repeats, args.steps,
                                        "edge"))
        for name in PLANS:
            spec = spec_for(edge, plans[name], 0, args.guidance)
            after[name] = predict(plans[name], after_cloud, after_edge, link, session=spec, spaces=spaces).latency_s
    load_after = os.getloadavg()

    # -- the tables ------------------------------------------------------------------------------------------
    sched = type(edge.make_scheduler()).__name__
    models_arg = f"--models {args.models} " + (f"--image-size {args.image_size} " if args.image_size else "")
    print(f"Command: `python bench/cost_check.py {models_arg}--repeats {args.repeats} --steps {args.steps} --guidance "
          f"{args.guidance:g} --profile-repeats {args.profile_repeats}`; {platform.machine()}, {os.cpu_count()} "
          f"cores, torch {torch.__version__}, one torch thread on each side; {described}, "
          f"{sched}, default codecs (int8 + zstd 3 latents, fp16 state), daemon defaults (max-batch 1, no previews); "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; daemon exit code {code}.\n")
    print("Profiles (`latentwire profile --threads 1`, ms, median of "
          f"{args.profile_repeats}): " + "; ".join(
              f"{p.name}: UNet step {ms(p.unet_step_s)}, text {ms(p.text_encode_s)}, decode {ms(p.vae_decode_s)}, "
              f"fused step {1e3 * (p.fused_step_s or 0):.3f}" for p in (cloud_p, edge_p)))
    ld = link_details
    biggest = max(max(x["bytes_up"], x["bytes_down"]) for rs in rows.values() for x in rs)
    print(f"Loopback link: RTT {ld['rtt_ms_median']:.3f} ms (median of {RTT_ROUNDS} {SMALL_BYTES}-byte ZeroMQ "
          f"round trips; p10 {ld['rtt_ms_p10']:.3f}, p90 {ld['rtt_ms_p90']:.3f}), bandwidth {ld['mbit_s']:.0f} "
          f"Mbit/s ({BIG_BYTES >> 20} MiB round trip {ld['big_round_trip_ms']:.1f} ms). At that rate the largest "
          f"message here ({biggest} bytes) takes {8 * biggest / ld['mbit_s']:.2f} us: loopback bandwidth is "
          "effectively infinite for these sessions (the model's transfer terms come out as microseconds).\n")

    print("### Measured vs predicted (median of repeats)\n")
    print("| plan | requests | measured s (min-max) | spread | predicted s | measured / predicted | within 15% |"
          + (" with profiles re-measured after |" if after else ""))
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |" + (" ---: |" if after else ""))
    summary = {}
    for name in PLANS:
        walls = [x["wall_s"] for x in rows[name]]
        med, pred = statistics.median(walls), statistics.median(x["predicted_s"] for x in rows[name])
        ratio = med / pred
        summary[name] = (med, pred, ratio)
        cell = f" {med / after[name]:.3f} |" if after else ""
        print(f"| {name} {dict(plans[name].params) or ''} | {rows[name][0]['requests']} | {med:.3f} ({min(walls):.3f}-"
              f"{max(walls):.3f}) | {100 * (max(walls) - min(walls)) / med:.0f}% | {pred:.3f} | {ratio:.3f} | "
              f"{'yes' if abs(ratio - 1) <= TOLERANCE else '**no**'} |" + cell)

    print("\n### Where the time goes (ms, medians)\n")
    parts = [p for p in rows[PLANS[0]][0]["parts"]]
    print("| plan | " + " | ".join(f"pred. {p}" for p in parts) + " | measured generate | measured decode |"
          + (" in-process (no wire) |" if args.in_process else "") + " measured - predicted |"
          + (" split - in-process |" if args.in_process else "") + " per request |")
    print("| --- |" + " ---: |" * (len(parts) + 3 + (2 if args.in_process else 0) + 1))
    gaps = {}
    for name in PLANS:
        rs = rows[name]
        med_parts = {p: statistics.median(x["parts"][p] for x in rs) for p in parts}
        gap = summary[name][0] - summary[name][1]
        reqs = rs[0]["requests"]
        cells = [ms(med_parts[p]) for p in parts]
        cells += [ms(statistics.median(x["generate_s"] for x in rs)), ms(statistics.median(x["decode_s"] for x in rs))]
        wire_gap = None
        if args.in_process:
            local = statistics.median(x["local_s"] for x in rs)
            wire_gap = summary[name][0] - local
            cells.append(ms(local))
        cells.append(ms(gap))
        if args.in_process:
            cells.append(ms(wire_gap))
        cells.append(ms(gap / reqs) if reqs else "-")
        gaps[name] = (gap, wire_gap, reqs)
        print(f"| {name} | " + " | ".join(cells) + " |")

    # EdgeClient counts every reply it reads, heartbeats (wire.Beat) included; the model counts no beat and
    # writes the Handoff's worker pid as TYPICAL_PID, this daemon's pid may take fewer msgpack bytes
    pid_delta = len(msgpack.packb(TYPICAL_PID)) - len(msgpack.packb(proc.pid))
    beat = wire_bytes(wire.Beat(0, False).to_frames())
    print("\n### Bytes (measured by EdgeClient's counters / predicted)\n")
    print(f"Down, the difference is read as beats x {beat} bytes (wire.Beat) less {pid_delta} bytes a Handoff (the "
          f"daemon's pid {proc.pid} against the model's TYPICAL_PID {TYPICAL_PID}).\n")
    print("| plan | bytes up (measured / predicted) | bytes down (measured / predicted) | down: measured / predicted, "
          "median | down: beats read, min-max (if the latent compressed as the model's noise) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in PLANS:
        rs = rows[name]
        ups, downs = sorted({x["bytes_up"] for x in rs}), sorted({x["bytes_down"] for x in rs})
        beats = [(x["bytes_down"] - x["predicted_down"] + pid_delta * x["requests"]) / beat for x in rs]
        span = lambda v: str(v[0]) if len(v) == 1 else f"{v[0]}-{v[-1]}"  # noqa: E731
        ratio = statistics.median(x["bytes_down"] / x["predicted_down"] for x in rs) if rs[0]["predicted_down"] else None
        print(f"| {name} | {span(ups)} / {span(sorted({x['predicted_up'] for x in rs}))} | {span(downs)} / "
              f"{span(sorted({x['predicted_down'] for x in rs}))} | {'-' if ratio is None else f'{ratio:.4f}'} | "
              f"{min(beats):.3g}-{max(beats):.3g} |")

    print("\n### One step's time, from where it was measured (ms)\n")
    print("UNet + fused step. Profile: `latentwire profile`, warm back-to-back calls in a process of its own, before "
          "(and after) the sessions. Back to back here: model.predict + FusedSampler.step in this process right "
          "after the sessions (--pairs). In the sessions: the interval between the ends of two edge steps "
          "(EdgeClient's on_step), steps 3 on; the 2nd step's interval is shown apart (the 1st holds the text "
          "encoding). The cloud's steps run in the daemon, where nothing times them one by one.\n")
    step = lambda p: p.unet_step_s + (p.fused_step_s or 0)  # noqa: E731
    print("| side | profile before | profile after | back to back here | in the sessions: 2nd step | later steps |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    in_session = [x for name in PLANS for x in rows[name] if x["edge_step_s"] is not None]
    for side, p, p_after in (("edge", edge_p, after_edge if after else None),
                             ("cloud", cloud_p, after_cloud if after else None)):
        here = f"{1e3 * statistics.median(terms['step_' + side]):.2f}" if terms else "-"
        sess = (f"{1e3 * statistics.median(x['edge_first_step_s'] for x in in_session):.2f} | "
                f"{1e3 * statistics.median(x['edge_step_s'] for x in in_session):.2f}") if side == "edge" else "- | -"
        print(f"| {side} | {1e3 * step(p):.2f} | {f'{1e3 * step(p_after):.2f}' if p_after else '-'} | {here} | "
              f"{sess} |")

    with_requests = [g for g in gaps.values() if g[2]]
    no_request = [g for g in gaps.values() if not g[2]]
    if with_requests:
        per = statistics.median(g[0] / g[2] for g in with_requests)
        line = (f"\nMedian gap (measured - predicted) per cloud request, plans with one: {ms(per)} ms; "
                f"edge-only (no request): {ms(no_request[0][0]) if no_request else '-'} ms.")
        if args.in_process:
            per_wire = statistics.median(g[1] / g[2] for g in with_requests)
            line += (f" Of the gap, the wire and the daemon (split - in-process) per request: {ms(per_wire)} ms; "
                     f"edge-only's split - in-process: {ms(no_request[0][1]) if no_request else '-'} ms.")
        print(line)
    if terms:
        med = {k: statistics.median(v) for k, v in terms.items()}
        decode_extra = statistics.median(x["decode_s"] for name in PLANS for x in rows[name]) - edge_p.vae_decode_s
        print(f"\n### What the model leaves out, measured on its own (ms; median of {args.pairs} interleaved pairs, "
              "p10-p90)\n")
        print("| term | where | measured | p10-p90 |")
        print("| --- | --- | ---: | ---: |")
        rng = lambda v: f"{1e3 * pct(v, 10):.2f}-{1e3 * pct(v, 90):.2f}"  # noqa: E731
        for key, what, where in (
                ("setup", "session setup on the edge", "every generate(): spec.make_scheduler() + FusedSampler"),
                ("request", "a cloud request (wire + daemon)", "a 1-step cloud-only session through the daemon - "
                                                               "the same in-process (run_plan)"),
                ("socket", "generate()'s socket, no request", "edge-only through EdgeClient - the same in-process"),
                ("loop_edge", "step loop, per edge step",
                 f"drive() of {args.steps} edge steps - {args.steps} x (predict + fused step), / {args.steps}"),
                ("loop_cloud", "step loop, per cloud step",
                 "the same on the cloud model (drive, not the engine's turn)"),
                ("wake_edge", "the edge resuming after a wait",
                 f"text encoding + 2 edge steps after {IDLE_S:g} s asleep - the same back to back"),
                ("wake_cloud", "the cloud resuming after a wait", "the same on the cloud model"),
                ("decode_after_steps", "decode right after UNet steps", "decode after 8 edge steps - decode after "
                                                                         "a decode"),
                ("wake_decode", "decode after a wait", f"decode after {IDLE_S:g} s asleep - decode after a decode")):
            print(f"| {what} | {where} | {1e3 * med[key]:.2f} | {rng(terms[key])} |")
        print(f"| (not a term: for comparison) | the edge's decode in the sessions above - the profile's "
              f"vae_decode_s | {1e3 * decode_extra:.2f} | |")
        print(f"\nThe model's one RTT per request is {link.rtt_ms:.3f} ms of the request term's "
              f"{1e3 * med['request']:.2f} ms.\n")
        print("Predicted plus these terms: setup once; per request the request term less the model's RTT (it holds "
              "the socket), else the socket term; the cloud's wake per request (the daemon waits between "
              "requests); the edge's wake where an edge stretch follows a cloud one; the decode's: after a wait "
              "where the plan ends on the cloud, else after steps. The loop terms are left out: they are 0 within "
              "their noise, which 20 steps would multiply.\n")
        print("| plan | measured s | predicted s | missing terms ms | predicted + terms s | "
              "measured / (predicted + terms) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name in PLANS:
            plan = plans[name]
            sides = [plan.segments[a].side for a, _ in stretches(plan)]
            reqs = rows[name][0]["requests"]
            extra = (med["setup"] + (reqs * (med["request"] - link.rtt_ms / 1e3 + med["wake_cloud"]) if reqs
                                     else med["socket"])
                     + sum(med["wake_edge"] for a, b in zip(sides, sides[1:]) if (a, b) == ("cloud", "edge"))
                     + (med["wake_decode"] if sides[-1] == "cloud" else med["decode_after_steps"]))
            m, p, _ = summary[name]
            print(f"| {name} | {m:.3f} | {p:.3f} | {1e3 * extra:.1f} | {p + extra:.3f} | {m / (p + extra):.3f} |")
    print(f"\n<!-- measured and printed in {time.perf_counter() - t_run:.0f} s; profiles and link in {tmp} -->")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "link": link_details, "after": after, "terms": terms,
                                               "profiles": {"cloud": str(cloud_path), "edge": str(edge_path),
                                                            "link": str(link_path)}}, indent=1))


if __name__ == "__main__":
    main()
