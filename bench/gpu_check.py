"""The Python half of bench/gpu_check.sh: the split over loopback (part b), versions, and the report (d).

    python bench/gpu_check.py split --out DIR [--device cuda] [--half float16]   # part (b) -> DIR/split.json
    python bench/gpu_check.py versions                                           # python, torch, triton, CUDA
    python bench/gpu_check.py report --out DIR                                   # -> DIR/gpu_report.md
    python bench/gpu_check.py selftest                                           # the report from made-up parts

Nothing here needs a GPU to run: `DEVICE=cpu bash bench/gpu_check.sh` rehearses every part on the CPU
(the daemons with --device cpu, the kernels interpreted), and `selftest` renders a report from made-up
logs, a made-up split and a made-up pytest-benchmark JSON, then checks what it says.
"""
import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red circle at the top left"
PLAN = "hybrid-sd"
READY_TIMEOUT_S = 90  # the cloud imports torch, diffusers and transformers and loads its models first
EDGE_TIMEOUT_S = 90  # a 20-step hybrid-sd run of the embedded models takes seconds; CUDA start-up adds some
STOP_TIMEOUT_S = 20
# What must not depend on the device or the dtype: the plan's accounting, not its numbers
COUNTS = ("plan", "steps", "cloud_model_calls", "edge_model_calls", "forecast_steps", "handoffs", "degraded")
PARTS = {  # name in status.tsv -> what the report calls it
    "install": "install (only if latentwire does not import)",
    "cuda": "torch sees a CUDA device",
    "kernels": "(a) Triton kernels compiled, against their torch references",
    "split": "(b) cloud and edge daemons on the device, split over loopback",
    "bench": "(c) device benchmarks",
}


# ---- part (b): the split ------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_summary(stdout):
    """The edge's --json summary: the last line of its stdout that is a JSON object, or None."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def compare_counts(a, b):
    """[(key, a's, b's)] for every COUNTS key the two summaries disagree on (a missing key counts)."""
    return [(k, a.get(k), b.get(k)) for k in COUNTS if k not in a or k not in b or a[k] != b[k]]


def image_difference(path_a, path_b):
    """{'max_abs', 'mean_abs'} of the 8-bit pixel values of two images of one size, or {'error': ...}."""
    try:
        import numpy as np
        from PIL import Image

        a = np.asarray(Image.open(path_a).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(path_b).convert("RGB"), dtype=np.int16)
    except Exception as e:  # a missing or unreadable image is a figure of the report, not a crash
        return {"error": f"{type(e).__name__}: {e}"}
    if a.shape != b.shape:
        return {"error": f"sizes differ: {a.shape} and {b.shape}"}
    d = np.abs(a - b)
    return {"max_abs": int(d.max()), "mean_abs": round(float(d.mean()), 3)}


def split_run(out, device, dtype, image):
    """One cloud daemon and one edge run on ``device`` in ``dtype`` -> a dict for split.json."""
    from latentwire.scheduler.serving.process import Child, ChildFailed, child_env, cli_command

    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    flags = ["--device", device, "--dtype", dtype]
    cloud_cmd = cli_command("cloud", "--bind", endpoint, *flags)
    edge_cmd = cli_command("edge", "--connect", endpoint, *flags, "--plan", PLAN, "--prompt", PROMPT, "--json",
                           "--out", str(out / image))
    run = {"device": device, "dtype": dtype, "image": image, "cloud_cmd": shlex.join(cloud_cmd),
           "edge_cmd": shlex.join(edge_cmd), "ok": False}
    name = Path(image).stem  # the logs are named after the run's image: gpu_edge, gpu_edge_fp32, cpu_edge_fp32
    start = time.monotonic()
    cloud = Child(cloud_cmd, log=out / f"split-cloud-{name}.log", name="the cloud")
    try:
        try:
            cloud.wait_ready("serving", READY_TIMEOUT_S)
        except ChildFailed as e:
            run["error"] = str(e)[-1500:]
            return run
        run["cloud_ready_s"] = round(time.monotonic() - start, 2)
        start = time.monotonic()
        try:
            edge = subprocess.run(edge_cmd, capture_output=True, text=True, timeout=EDGE_TIMEOUT_S, env=child_env())
        except subprocess.TimeoutExpired:
            run["error"] = f"the edge did not finish within {EDGE_TIMEOUT_S} s"
            return run
        run["edge_s"] = round(time.monotonic() - start, 2)
        (out / f"split-edge-{name}.log").write_text(edge.stdout + "\n--- stderr ---\n" + edge.stderr)
        summary = parse_summary(edge.stdout)
        if edge.returncode != 0 or summary is None:
            run["error"] = f"the edge exited with {edge.returncode}: {edge.stderr.strip()[-1500:]}"
            return run
        run["summary"], run["ok"] = summary, True
        return run
    finally:
        run["cloud_exit"] = cloud.stop(STOP_TIMEOUT_S)


def split(out, device, half):
    """Part (b): (device, half), (device, float32) and (cpu, float32); the last two must count alike."""
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "runs": []}
    path = out / "split.json"
    for dev, dtype, image in [(device, half, "gpu_edge.png"), (device, "float32", "gpu_edge_fp32.png"),
                              ("cpu", "float32", "cpu_edge_fp32.png")]:
        result["runs"].append(split_run(out, dev, dtype, image))
        path.write_text(json.dumps(result, indent=1))  # after each run: a timeout keeps what was done
    runs = result["runs"]
    if runs[1]["ok"] and runs[2]["ok"]:
        result["count_differences"] = compare_counts(runs[1]["summary"], runs[2]["summary"])
        result["image_fp32_vs_cpu"] = image_difference(out / runs[1]["image"], out / runs[2]["image"])
    if runs[0]["ok"] and runs[2]["ok"]:
        result["image_half_vs_cpu"] = image_difference(out / runs[0]["image"], out / runs[2]["image"])
    result["ok"] = all(r["ok"] for r in runs) and result.get("count_differences") == []
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    for r in runs:
        print(f"{r['device']} {r['dtype']}: {'ok' if r['ok'] else 'FAILED: ' + r.get('error', '?')}")
    return 0 if result["ok"] else 1


def _tail(path, n=1500):
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ---- versions ---------------------------------------------------------------------------------------------

def versions():
    import platform

    lines = [f"python {platform.python_version()} on {platform.machine()}"]
    for mod in ("torch", "triton", "diffusers", "transformers", "numpy"):
        try:
            lines.append(f"{mod} {__import__(mod).__version__}")
        except Exception as e:
            lines.append(f"{mod}: not importable ({type(e).__name__}: {e})")
    try:
        import torch

        lines.append(f"torch CUDA build {torch.version.cuda}; cuda available {torch.cuda.is_available()}")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2 ** 30:.0f} GiB")
    except Exception as e:
        lines.append(f"torch.cuda: {type(e).__name__}: {e}")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')}")
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--short"], capture_output=True, text=True)
    if git.returncode == 0:
        lines.append(f"git {git.stdout.strip()} ({len(dirty.stdout.splitlines())} files changed or untracked)")
    print("\n".join(lines))
    return 0


# ---- part (d): the report --------------------------------------------------------------------------------

def read_status(path):
    """status.tsv lines 'name<TAB>rc<TAB>seconds' -> {name: (rc, seconds)}; rc may be 'dry-run' or 'skipped'."""
    status = {}
    if path.exists():
        for line in path.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) == 3:
                status[fields[0]] = (fields[1], fields[2])
    return status


def verdict(rc):
    return {"0": "pass", "124": "FAIL (timed out)", "137": "FAIL (killed after timing out)",
            "dry-run": "not run (dry run)", "skipped": "not run (no time left)"}.get(rc, f"FAIL (exit code {rc})")


def pytest_summary(log_text):
    """pytest's last summary line ('12 passed, 1 failed in 3.4s'), and its FAILED/ERROR lines."""
    lines = log_text.splitlines()
    summary = next((ln.strip("= ") for ln in reversed(lines)
                    if any(w in ln for w in (" passed", " failed", " error", " skipped", "no tests ran"))), "")
    failed = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    return summary, failed


def bench_rows(bench):
    """pytest-benchmark JSON -> [(group, test, median us, speed over the group's baseline, extra)]."""
    rows, base = [], {}
    for b in bench.get("benchmarks", []):
        if b.get("extra_info", {}).get("baseline"):
            base[b.get("group")] = b["stats"]["median"]
    for b in bench.get("benchmarks", []):
        info = {k: v for k, v in b.get("extra_info", {}).items() if k not in ("baseline", "fp32_bytes", "GB/s")}
        median = b["stats"]["median"]
        ratio = base[b["group"]] / median if b.get("group") in base else None
        rows.append((b.get("group"), b.get("name"), median * 1e6, ratio, info))
    return rows


def render(out):
    """The report's markdown from what the parts left in ``out``."""
    status = read_status(out / "status.tsv")
    log = lambda name: _tail(out / f"{name}.log", 100_000)  # noqa: E731
    lines = ["# latentwire GPU check", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by "
             "`bash bench/gpu_check.sh` (bench/gpu_check.py report).", ""]
    lines += ["| part | result | seconds | figures |", "| --- | --- | ---: | --- |"]
    split_json = _load_json(out / "split.json")
    bench_json = _load_json(out / "bench.json")
    for name, title in PARTS.items():
        if name not in status:
            if name == "install":
                lines.append(f"| {title} | not needed (latentwire imports) | | |")
            else:
                lines.append(f"| {title} | not run | | |")
            continue
        rc, seconds = status[name]
        figures = []
        if name in ("kernels", "bench"):
            figures.append(pytest_summary(log(name))[0])
        if name == "split" and split_json:
            figures.append(_split_figures(split_json))
        if name == "bench" and bench_json:
            figures.append(f"{len(bench_json.get('benchmarks', []))} benchmarks in bench.json")
        lines.append(f"| {title} | {verdict(rc)} | {seconds} | {'; '.join(f for f in figures if f)} |")
    lines.append("")
    for name in ("kernels", "bench"):
        failed = pytest_summary(log(name))[1] if name in status else []
        if failed:
            lines += [f"### {name}: failures", "", "```", *failed[:40], "```", ""]
    if split_json:
        lines += _split_section(split_json)
    if bench_json:
        lines += _bench_section(bench_json)
    for name, title in (("nvidia-smi", "nvidia-smi"), ("versions", "Versions")):
        text = log(name).strip() if name in status else ""
        lines += [f"## {title}", "", "```", text or "(not recorded)", "```", ""]
    return "\n".join(lines)


def _load_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _split_figures(split_json):
    diffs = split_json.get("count_differences")
    ok = sum(r["ok"] for r in split_json.get("runs", []))
    counts = ("model-call counts equal (float32 on the device vs the CPU)" if diffs == [] else
              "counts not compared" if diffs is None else f"counts differ: {diffs}")
    return f"{ok}/3 runs completed; {counts}"


def _split_section(split_json):
    lines = ["## (b) Split runs", "", "| device | dtype | result | cloud ready s | edge s | cloud calls | edge calls "
             "| forecast steps | handoffs | bytes up | bytes down | edge wall s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in split_json.get("runs", []):
        s = r.get("summary") or {}
        cells = [r["device"], r["dtype"], "ok" if r["ok"] else "FAILED", r.get("cloud_ready_s", ""),
                 r.get("edge_s", ""), *(s.get(k, "") for k in ("cloud_model_calls", "edge_model_calls",
                                                               "forecast_steps", "handoffs", "bytes_up",
                                                               "bytes_down", "wall_s"))]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    for key, what in (("image_fp32_vs_cpu", "float32 on the device vs float32 on the CPU"),
                      ("image_half_vs_cpu", "half precision on the device vs float32 on the CPU")):
        if key in split_json:
            lines.append(f"- image pixels (0..255), {what}: {split_json[key]}")
    for r in split_json.get("runs", []):
        error = " ".join(r["error"].split()) if "error" in r else ""  # one line: it is a list item
        lines.append(f"- `{r['cloud_cmd']}` then `{r['edge_cmd']}`" + (f": **{error}**" if error else ""))
    return lines + [""]


def _bench_section(bench_json):
    cpu = bench_json.get("machine_info", {}).get("cpu", {}).get("brand_raw")
    lines = ["## (c) Benchmarks", ""] + ([f"CPU: {cpu}", ""] if cpu else []) + [
             "| group | benchmark | median us | speed over the group's baseline | extra |",
             "| --- | --- | ---: | ---: | --- |"]
    for group, name, median, ratio, info in bench_rows(bench_json):
        r = f"{ratio:.2f}x" if ratio else ""
        lines.append(f"| {group} | {name} | {median:.1f} | {r} | {json.dumps(info) if info else ''} |")
    return lines + [""]


def report(out):
    out.mkdir(parents=True, exist_ok=True)
    text = render(out)
    (out / "gpu_report.md").write_text(text)
    print(f"wrote {out / 'gpu_report.md'}")
    return 0


# ---- selftest --------------------------------------------------------------------------------------------

def selftest():
    """Render a report from made-up parts and check it says what they did."""
    summary = {"plan": "hybrid-sd", "steps": 20, "cloud_model_calls": 8, "edge_model_calls": 12, "forecast_steps": 0,
               "handoffs": 1, "degraded": False, "bytes_up": 1374, "bytes_down": 998, "wall_s": 1.5}
    assert parse_summary("progress\n" + json.dumps(summary) + "\n") == summary
    assert parse_summary("no json here\n{broken") is None
    assert compare_counts(summary, dict(summary, wall_s=9.9)) == []  # timings may differ
    assert compare_counts(summary, dict(summary, edge_model_calls=11)) == [("edge_model_calls", 12, 11)]
    assert compare_counts(summary, {k: v for k, v in summary.items() if k != "handoffs"}) == [("handoffs", 1, None)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "status.tsv").write_text("cuda\t0\t1\nversions\t0\t2\nkernels\t1\t42\nsplit\t0\t30\n"
                                        "bench\t124\t170\n")
        (out / "kernels.log").write_text("....F\nFAILED tests/test_kernel_fused_step.py::test_x[a] - assert\n"
                                         "======= 1 failed, 157 passed in 40.1s =======\n")
        (out / "bench.log").write_text("...\n")
        (out / "versions.log").write_text("torch 2.13.0\n")
        runs = [{"device": "cuda", "dtype": d, "image": "x.png", "cloud_cmd": "latentwire cloud",
                 "edge_cmd": "latentwire edge", "ok": True, "cloud_ready_s": 3.0, "edge_s": 2.0, "summary": summary}
                for d in ("float16", "float32")]
        runs.append(dict(runs[1], device="cpu"))
        (out / "split.json").write_text(json.dumps({"runs": runs, "count_differences": [], "ok": True,
                                                    "image_fp32_vs_cpu": {"max_abs": 1, "mean_abs": 0.01}}))
        bench = {"benchmarks": [
            {"group": "g", "name": "test[copy]", "stats": {"median": 1e-5}, "extra_info": {"baseline": True}},
            {"group": "g", "name": "test[fused]", "stats": {"median": 2e-5},
             "extra_info": {"baseline": False, "launches": 1, "host_syncs": 0}}]}
        (out / "bench.json").write_text(json.dumps(bench))
        text = render(out)
    expected = ["| (a) Triton kernels compiled, against their torch references | FAIL (exit code 1) | 42 | "
                "1 failed, 157 passed in 40.1s |",
                "FAILED tests/test_kernel_fused_step.py::test_x[a] - assert",
                "| (b) cloud and edge daemons on the device, split over loopback | pass | 30 | 3/3 runs completed; "
                "model-call counts equal",
                "| (c) device benchmarks | FAIL (timed out) | 170 | 2 benchmarks in bench.json |",
                "| install (only if latentwire does not import) | not needed",
                "| cpu | float32 | ok | 3.0 | 2.0 | 8 | 12 | 0 | 1 | 1374 | 998 | 1.5 |",
                "| g | test[fused] | 20.0 | 0.50x | {\"launches\": 1, \"host_syncs\": 0} |",
                "torch 2.13.0", "## nvidia-smi", "(not recorded)"]
    missing = [e for e in expected if e not in text]
    if missing:
        print(text)
        print("selftest: missing from the report:", *missing, sep="\n  ")
        return 1
    print("selftest: ok")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="part (b): the daemons split over loopback")
    s.add_argument("--out", type=Path, default=Path("gpu-out"))
    s.add_argument("--device", default="cuda")
    s.add_argument("--half", default="float16", choices=["float16", "bfloat16", "float32"])
    r = sub.add_parser("report", help="part (d): gpu_report.md from what the parts left")
    r.add_argument("--out", type=Path, default=Path("gpu-out"))
    sub.add_parser("versions", help="python, torch, triton, diffusers, CUDA devices, git commit")
    sub.add_parser("selftest", help="render a report from made-up parts and check it")
    args = parser.parse_args(argv)
    # `timeout` sends SIGTERM: stop the daemons (the finally clauses) rather than die and leave them
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.cmd == "split":
        return split(args.out, args.device, args.half)
    if args.cmd == "report":
        return report(args.out)
    if args.cmd == "versions":
        return versions()
    return selftest()


if __name__ == "__main__":
    sys.exit(main())
