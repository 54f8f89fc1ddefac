#!/usr/bin/env bash
# The GPU check, prepared for the day a CUDA machine is lent. Run it from the repository root:
#
#   bash bench/gpu_check.sh                 on the CUDA machine: at most TOTAL_S (440 s) plus the report;
#                                           writes $OUT/gpu_report.md (OUT defaults to ./gpu-out)
#   DEVICE=cpu bash bench/gpu_check.sh      every part on this CPU instead (kernels interpreted): a rehearsal
#   DRY_RUN=1 bash bench/gpu_check.sh       print what each part would run; run only the report's selftest
#
# Parts, each under `timeout` (its own limit, or what is left of TOTAL_S if that is less), each logged
# to $OUT/NAME.log with "NAME rc seconds" in $OUT/status.tsv; a failed part does not stop the next:
#   install   pip install -e '.[dev,bench]' with constraints.txt, only if `import latentwire` fails (the torch
#             installed, and the triton it needs, are kept)
#   (a) kernels   the Triton kernels compiled (TRITON_INTERPRET unset), against their torch references
#   (b) split     `latentwire cloud` and `latentwire edge` on the device over loopback: float16, then float32
#                 against a CPU float32 run (equal model-call counts); bench/gpu_check.py split
#   (c) bench     bench/test_step_device.py (launches, host syncs, CUDA graph) and bench/test_fused_step.py
#   (d) report    nvidia-smi, versions, and $OUT/gpu_report.md (bench/gpu_check.py report)
set -u
# keep the repository root off every Python's sys.path: its kernels/ would shadow Hugging Face's kernels
export PYTHONSAFEPATH=1

OUT=${OUT:-./gpu-out}
DEVICE=${DEVICE:-cuda}
HALF=${HALF:-float16}
PY=${PYTHON:-python}
TOTAL_S=${TOTAL_S:-440}  # for the parts; with one 10 s kill grace and the 20 s report: under 8 minutes
DRY_RUN=${DRY_RUN:-0}
KILL_GRACE_S=10

if [ ! -f bench/gpu_check.py ] || [ ! -f setup.py ]; then
    echo "bench/gpu_check.sh: run it from the repository root (where setup.py is), not from $(pwd)" >&2
    exit 2
fi
mkdir -p "$OUT"
: > "$OUT/status.tsv"

# part NAME LIMIT_S COMMAND...: COMMAND under timeout, output in $OUT/NAME.log, "NAME rc seconds" in status.tsv
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((TOTAL_S - SECONDS))
    local budget=$((limit < left ? limit : left))
    if [ "$DRY_RUN" = 1 ]; then
        printf '%s\tdry-run\t0\n' "$name" >> "$OUT/status.tsv"
        echo "[dry run] $name, timeout ${limit} s: $*"
        return 0
    fi
    if [ "$budget" -lt 5 ]; then
        printf '%s\tskipped\t0\n' "$name" >> "$OUT/status.tsv"
        echo "== $name: skipped, ${left} s of ${TOTAL_S} left"
        return 0
    fi
    echo "== $name (timeout ${budget} s): $*"
    local start=$SECONDS
    timeout --kill-after="$KILL_GRACE_S" "$budget" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/status.tsv"
    echo "   exit code $rc after $((SECONDS - start)) s; last line: $(tail -n 1 "$OUT/$name.log")"
}

# install: only when latentwire does not import, and never another torch (the machine's is kept)
if ! "$PY" -c 'import latentwire' 2> /dev/null; then
    TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)' 2> /dev/null)
    if [ -n "$TORCH_VERSION" ]; then
        # the suite's tested versions, but the machine's own torch (and the triton its CUDA build asks for)
        { grep -vE '^(torch|triton)==' constraints.txt; echo "torch==$TORCH_VERSION"; } > "$OUT/constraints.txt"
        part install 150 "$PY" -m pip install -c "$OUT/constraints.txt" -e '.[dev,bench]'
    else
        part install 150 false  # no torch: install one for this machine's CUDA first (README, "Set up and run")
    fi
fi

if [ "$DEVICE" != cpu ]; then
    part cuda 60 "$PY" -c 'import sys, torch
sys.exit("torch sees no CUDA device") if not torch.cuda.is_available() else print(torch.cuda.get_device_name(0))'
fi
part nvidia-smi 20 nvidia-smi
part versions 60 "$PY" bench/gpu_check.py versions

# (a) compiled kernels: on CUDA tests/conftest.py leaves TRITON_INTERPRET unset, and it must not come from here
part kernels 150 env -u TRITON_INTERPRET "$PY" -m pytest tests/test_kernel_fused_step.py tests/test_kernel_quantize.py \
    -q -rfE

# (b) the daemons on the device, split over loopback
part split 130 "$PY" bench/gpu_check.py split --out "$OUT" --device "$DEVICE" --half "$HALF"

# (c) the device benchmarks; --benchmark-max-time bounds each benchmark's rounds (default 1 s each)
part bench 170 env -u TRITON_INTERPRET "$PY" -m pytest bench/test_step_device.py bench/test_fused_step.py \
    --benchmark-only --benchmark-json="$OUT/bench.json" --benchmark-max-time=0.3 \
    --benchmark-columns=min,median,rounds -q -rfE

# (d) the report; it runs whatever the parts left, even in a dry run
if [ "$DRY_RUN" = 1 ]; then
    "$PY" bench/gpu_check.py selftest
fi
if ! timeout 20 "$PY" bench/gpu_check.py report --out "$OUT"; then
    {   # the Python report failed: the bare facts, so the run is not lost
        echo "# latentwire GPU check (fallback report: bench/gpu_check.py report failed)"
        echo
        echo '```'
        cat "$OUT/status.tsv"
        echo '```'
        for f in "$OUT"/*.log; do
            echo "## $f"; echo '```'; tail -n 30 "$f"; echo '```'
        done
    } > "$OUT/gpu_report.md"
fi
echo "report: $OUT/gpu_report.md ($SECONDS s in all)"
# a part failed, timed out or was skipped (nvidia-smi's absence is a figure, not a failure)
FAILED=$(awk -F'\t' '$1 != "nvidia-smi" && $2 != "0" && $2 != "dry-run"' "$OUT/status.tsv" | cut -f1 | tr '\n' ' ')
if [ -n "$FAILED" ]; then
    echo "failed or not run: $FAILED"
    exit 1
fi
