"""Cost model vs reality across a real bandwidth-limited link: the cloud daemon and the edge in two network
namespaces joined by a veth pair, each end's egress shaped by `tc qdisc ... tbf`, CURVE on the wire.

    sudo .venv/bin/python bench/link_check.py [--mbit 1,10,50] [--rtt-ms 55.25] [--models tiny-sd]
                                              [--codec int8] [--repeats 3] [--steps 20] [--json FILE]

Needs root (`ip netns`, `tc`); a benchmark, not a test. What it does:

1. Two namespaces, lw-cloud (10.77.0.1) and lw-edge (10.77.0.2), joined by a veth pair; removed at the end
   (also on an error or Ctrl-C). Nothing outside the pair is addressed.
2. The model pair (bench/cost_check.py's --models: tiny random UNets at SD v1.5's latent size by default,
   so that every message has a real model's size) and its profiles, measured by `latentwire profile`.
3. One `latentwire cloud` in lw-cloud, bound to tcp://10.77.0.1, with CURVE (`--curve-secret`, `--allow`:
   off loopback the daemon refuses to serve in the clear). This process then moves itself into lw-edge
   (setns(2), before its first socket) and is the edge, with the CURVE client keys.
4. For each bandwidth: `tbf rate R` on both ends (the edge's egress is the uplink, the cloud's the
   downlink); the link's ZeroMQ goodput measured with a large echoed message; then rounds of sessions of
   every built-in plan, as cost_check.py runs them. This kernel has no netem, so the round-trip time is
   latentwire's own link emulation (EdgeClient's link: half the RTT on each message sent and received, at
   an unbounded rate: the bandwidth is tbf's); the veth's own round trip is measured and added.
5. predict() with a link profile of R each way and that RTT; the tables: measured against predicted per
   plan and bandwidth, within 15% or not, the transfer terms, bytes, and goodput against R.
"""
import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import cost_check as cc  # noqa: E402  (the sessions, profiles and model pairs of the loopback check)
import daemons  # noqa: E402

from latentwire.pipelines.models import load_model  # noqa: E402
from latentwire.scheduler import make, wire  # noqa: E402
from latentwire.scheduler.cost.model import predict  # noqa: E402
from latentwire.scheduler.cost.profiles import load_device, load_link  # noqa: E402
from latentwire.scheduler.serving.link import Link  # noqa: E402
from latentwire.scheduler.serving.security import write_keys  # noqa: E402

CLOUD_NS, EDGE_NS = "lw-cloud", "lw-edge"
CLOUD_IF, EDGE_IF = "lw-c", "lw-e"
CLOUD_IP, EDGE_IP = "10.77.0.1", "10.77.0.2"
PORT = 5557
CLONE_NEWNET = 0x40000000
UNBOUNDED_MBIT = 1e6  # the emulated link's rate: only its delay is wanted, tbf sets the bandwidth
GOODPUT_BYTES = 1 << 18  # echoed both ways: 2 x 2.1 s at 1 Mbit/s
GOODPUT_ROUNDS = 3
RTT_ROUNDS = 200


def sh(*cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def in_ns(ns):
    return ("ip", "netns", "exec", ns)


# -- the link -------------------------------------------------------------------------------------------------

def make_link():
    teardown()
    sh("ip", "netns", "add", CLOUD_NS)
    sh("ip", "netns", "add", EDGE_NS)
    sh("ip", "link", "add", CLOUD_IF, "type", "veth", "peer", "name", EDGE_IF)
    for ns, dev, ip in ((CLOUD_NS, CLOUD_IF, CLOUD_IP), (EDGE_NS, EDGE_IF, EDGE_IP)):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def teardown():
    for ns in (CLOUD_NS, EDGE_NS):  # deleting a namespace deletes its end of the veth, and so the pair
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def burst_bytes(mbit):
    # tbf's bucket: at least two full frames (1514 bytes), else about 1 ms at the rate, so that a message
    # of a few kilobytes is not let through at line rate in one burst
    return max(2 * 1514, int(mbit * 1e6 / 8 / 1000))


def shape(mbit):
    """tbf at ``mbit`` Mbit/s on both ends' egress -> the tc lines, as set."""
    lines = []
    for ns, dev in ((CLOUD_NS, CLOUD_IF), (EDGE_NS, EDGE_IF)):
        sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst",
           str(burst_bytes(mbit)), "latency", "2s")
        lines.append(f"{ns}: " + sh("tc", "-n", ns, "qdisc", "show", "dev", dev).strip())
    return lines


def enter(ns):
    """Move this process's thread into network namespace ``ns``: sockets made afterwards, and threads and
    processes started afterwards, are there (Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def echo_round_trips(sizes_rounds):
    """Round trips (seconds) of messages echoed in the cloud namespace -> {size: [s]}; one warm-up each."""
    return cc.echo_round_trips(CLOUD_IP, [(size, rounds, 1) for size, rounds in sizes_rounds], prefix=in_ns(CLOUD_NS))


# -- main -----------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbit", default="1,10,50", help="the bandwidths, Mbit/s each way, comma-separated")
    ap.add_argument("--rtt-ms", type=float, default=55.25,
                    help="the round-trip time added in user space (default: the lte profile's)")
    ap.add_argument("--models", choices=sorted(cc.MODELS), default="tiny-sd")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--codec", default="int8", help="the latent codec (zstd 3), e.g. int8, fp16, fp32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--profile-repeats", type=int, default=10)
    ap.add_argument("--json", help="also write every row here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/link_check.py needs root: it makes network namespaces and shapes them with tc")
    try:
        bandwidths = [float(v) for v in args.mbit.split(",")]
    except ValueError:
        ap.error(f"--mbit {args.mbit!r}: comma-separated numbers of Mbit/s, e.g. 1,10,50")
    if not all(0 < v <= 10_000 for v in bandwidths) or args.rtt_ms < 0 or args.repeats < 1 or args.steps < 1:
        ap.error("--mbit values in (0, 10000], --rtt-ms >= 0, --repeats and --steps >= 1")
    from latentwire.protocol import CODECS

    if args.codec not in CODECS:
        ap.error(f"--codec {args.codec!r}: one of {', '.join(CODECS)}")
    torch.set_num_threads(1)
    t_run = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="latentwire-link-check-"))
    codecs = wire.Codecs(latent=(args.codec, 3))
    cloud_dir, edge_dir, described = cc.model_pair(args.models, args.image_size, tmp)
    cloud_p = load_device(cc.profile(cloud_dir, tmp / "cloud.json", args.profile_repeats, args.steps, "cloud"))
    edge_p = load_device(cc.profile(edge_dir, tmp / "edge.json", args.profile_repeats, args.steps, "edge"))
    edge = load_model(str(edge_dir))
    plans = {name: make(name, args.steps) for name in cc.PLANS}
    spaces = (wire.plain(edge.latent_space), wire.plain(edge.text_space))
    server_pub, server_secret = write_keys(tmp / "server", "server")
    client_pub, client_secret = write_keys(tmp / "client", "edge")
    (tmp / "allow").mkdir()
    shutil.copy(client_pub, tmp / "allow")
    client = dict(codecs=codecs, curve_secret=str(client_secret), server_key=str(server_pub),
                  link=Link("rtt", UNBOUNDED_MBIT, args.rtt_ms / 2))
    make_link()
    proc, rows, links, n = None, [], {}, 0
    try:
        proc = daemons.start("cloud", "--bind", f"tcp://{CLOUD_IP}:{PORT}", "--model", str(cloud_dir), "--threads",
                             "1", "--curve-secret", str(server_secret), "--allow", str(tmp / "allow"),
                             same_threads=False, prefix=in_ns(CLOUD_NS))
        enter(EDGE_NS)
        veth_rtt = statistics.median(echo_round_trips([(64, RTT_ROUNDS)])[64])
        endpoint = f"tcp://{CLOUD_IP}:{PORT}"
        for mbit in bandwidths:
            tc = shape(mbit)
            trips = echo_round_trips([(64, 20), (GOODPUT_BYTES, GOODPUT_ROUNDS)])
            small, big = statistics.median(trips[64]), statistics.median(trips[GOODPUT_BYTES])
            goodput = 2 * 8 * GOODPUT_BYTES / (big - small) / 1e6
            profile = {"name": f"veth-tbf-{mbit:g}", "up_mbit_s": mbit, "down_mbit_s": mbit,
                       "rtt_ms": args.rtt_ms + 1e3 * veth_rtt,
                       "sources": {"up_mbit_s": f"tc tbf rate {mbit:g}mbit on the edge's veth end (bench/link_check.py)",
                                   "down_mbit_s": f"tc tbf rate {mbit:g}mbit on the cloud's veth end",
                                   "rtt_ms": f"{args.rtt_ms:g} ms emulated in user space (EdgeClient's link) + the "
                                             f"veth's measured round trip, {1e3 * veth_rtt:.3f} ms"}}
            path = tmp / f"link-{mbit:g}.json"
            path.write_text(json.dumps(profile, indent=2))
            link = load_link(str(path))
            links[mbit] = dict(tc=tc, goodput_mbit_s=goodput, small_rtt_ms=1e3 * small)
            for r in range(1 + args.repeats):  # round 0: warm-up
                for name in cc.PLANS:
                    spec = cc.spec_for(edge, plans[name], n, args.guidance)
                    n += 1
                    row = cc.split_session(endpoint, edge, spec, **client)
                    cost = predict(plans[name], cloud_p, edge_p, link, session=spec, spaces=spaces, codecs=codecs)
                    row.update(plan=name, mbit=mbit, round=r, predicted_s=cost.latency_s, parts=dict(cost.parts),
                               predicted_up=cost.bytes_up, predicted_down=cost.bytes_down)
                    if r:
                        rows.append(row)
    finally:
        code = daemons.stop(proc) if proc is not None else None
        teardown()

    print(f"Command: `sudo .venv/bin/python bench/link_check.py --mbit {args.mbit} --rtt-ms {args.rtt_ms:g} --models "
          f"{args.models} --codec {args.codec} --repeats {args.repeats} --steps {args.steps}`; {platform.machine()}, "
          f"{os.cpu_count()} cores, kernel {platform.release()}, torch {torch.__version__}; {described}, "
          f"{type(edge.make_scheduler()).__name__}, guidance {args.guidance:g}, latent codec {args.codec} + zstd 3, "
          f"state fp16; `latentwire cloud` in {CLOUD_NS} with CURVE, the edge in {EDGE_NS}; daemon exit code "
          f"{code}.\n")
    print(f"Profiles (ms, median of {args.profile_repeats}): " + "; ".join(
        f"{p.name}: UNet step {cc.ms(p.unet_step_s)}, text {cc.ms(p.text_encode_s)}, decode {cc.ms(p.vae_decode_s)}"
        for p in (cloud_p, edge_p)) + f". The veth's own round trip (64 bytes, unshaped, median of {RTT_ROUNDS}): "
        f"{1e3 * veth_rtt:.3f} ms.\n")
    print("### The link at each rate\n")
    print(f"Goodput: a {GOODPUT_BYTES}-byte message echoed through ZeroMQ (median of {GOODPUT_ROUNDS} round trips, "
          "less a 64-byte round trip), both ways: what TCP/IP and ZeroMQ framing leave of tbf's rate.\n")
    print("| tbf rate Mbit/s | burst bytes | goodput Mbit/s | goodput / rate |")
    print("| ---: | ---: | ---: | ---: |")
    for mbit, d in links.items():
        print(f"| {mbit:g} | {burst_bytes(mbit)} | {d['goodput_mbit_s']:.2f} | {d['goodput_mbit_s'] / mbit:.3f} |")
    print("\n### Measured vs predicted (median of repeats)\n")
    print("| Mbit/s | plan | measured s (min-max) | predicted s | measured / predicted | within 15% | pred. transfer "
          "up + down ms | pred. rtt ms | measured - predicted ms | bytes up / down (measured) | predicted |")
    print("| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    summary = {}
    for mbit in bandwidths:
        for name in cc.PLANS:
            rs = [x for x in rows if x["mbit"] == mbit and x["plan"] == name]
            walls = [x["wall_s"] for x in rs]
            med, pred = statistics.median(walls), statistics.median(x["predicted_s"] for x in rs)
            summary[(mbit, name)] = med / pred
            transfer = statistics.median(x["parts"]["transfer_up"] + x["parts"]["transfer_down"] for x in rs)
            rtt = statistics.median(x["parts"]["rtt"] for x in rs)
            up = statistics.median(x["bytes_up"] for x in rs)
            down = statistics.median(x["bytes_down"] for x in rs)
            print(f"| {mbit:g} | {name} {dict(plans[name].params) or ''} | {med:.3f} ({min(walls):.3f}-{max(walls):.3f}) | {pred:.3f} | "
                  f"{med / pred:.3f} | {'yes' if abs(med / pred - 1) <= cc.TOLERANCE else '**no**'} | "
                  f"{cc.ms(transfer)} | {cc.ms(rtt)} | {cc.ms(med - pred)} | {up:.0f} / {down:.0f} | "
                  f"{rs[0]['predicted_up']} / {rs[0]['predicted_down']} |")
    inside = sum(abs(v - 1) <= cc.TOLERANCE for v in summary.values())
    print(f"\n{inside} of {len(summary)} plan x bandwidth cells within 15%; ratios {min(summary.values()):.3f} to "
          f"{max(summary.values()):.3f}.")
    print(f"\n<!-- measured and printed in {time.perf_counter() - t_run:.0f} s; profiles and links in {tmp} -->")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "links": {str(k): v for k, v in links.items()},
                                               "veth_rtt_s": veth_rtt}, indent=1))


if __name__ == "__main__":
    main()
