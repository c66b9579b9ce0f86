#!/usr/bin/env bash
# One GPU check: the gpu-marked tests, the forward benchmark suite (attncc vs FlexAttention and
# SDPA, bf16, D 64 and 128), every library pattern forward, and forward + backward of the
# library patterns at D 128, in under 8.5 minutes, with a Markdown
# report in $OUT/gpu_check.md (or out/gpu_check.md). Each part has its own timeout and the
# script goes on after a failing part; without a CUDA device it writes a note and exits 0.
#
#   bash bench/gpu_check.sh            # from the repository root
set -u
cd "$(dirname "$0")/.." || exit 1
DEST="${OUT:-out}"
mkdir -p "$DEST"
REPORT="$DEST/gpu_check.md"
PY="${PYTHON:-python3}"
START=$(date +%s)
: > "$REPORT"

note() { printf '%s\n' "$*" | tee -a "$REPORT"; }

# part NAME SECONDS COMMAND...: run with a timeout, record status and duration.
part() {
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s) rc
    echo "== $name (limit ${limit}s)" >&2
    timeout --kill-after=10 "$limit" "$@" > "$DEST/$name.log" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    local status="ok"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMED OUT (partial results kept)"
    [ $rc -ne 0 ] && [ "$status" = "ok" ] && status="FAILED (exit $rc)"
    note "- $name: $status, ${dt} s (log: $DEST/$name.log)"
    return 0
}

note "# attncc GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
note ""
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    note "skipped: no CUDA device visible to torch (nothing was run)"
    exit 0
fi
note "device: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__)' 2>&1)"
note "triton: $("$PY" -c 'import triton; print(triton.__version__)' 2>&1)"
note ""

# 1. gpu-marked tests (~2.5 min)
part gpu_tests 150 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
# 2. forward suite (causal, sliding window, NATTEN, GNA, documents) at D 64 and D 128
part forward_d64 60 "$PY" bench/bench_forward.py --suite gpu --head-dim 64 --reps 10 \
    --out "$DEST/forward_d64.md"
part forward_d128 60 "$PY" bench/bench_forward.py --suite gpu --head-dim 128 --reps 10 \
    --out "$DEST/forward_d128.md"
# 3. every library pattern, D 64 and 128 (rows written as they finish)
: > "$DEST/library.md"
part library 130 "$PY" bench/bench_library_gpu.py --dims 64 128 --reps 10 --out "$DEST/library.md"
# 4. forward + backward of every library pattern at D 128 (generated dQ/dK-dV vs flex's own)
: > "$DEST/library_train.md"
part library_train 100 "$PY" bench/bench_library_gpu.py --backward --dims 128 --reps 5 \
    --out "$DEST/library_train.md"

note ""
note "## gpu tests (tail)"
tail -n 15 "$DEST/gpu_tests.log" 2>/dev/null | sed 's/^/    /' >> "$REPORT"
for f in forward_d64 forward_d128 library library_train; do
    note ""
    note "## $f"
    note ""
    cat "$DEST/$f.md" >> "$REPORT" 2>/dev/null || note "(no table: see $DEST/$f.log)"
done
note ""
note "total: $(( $(date +%s) - START )) s"
exit 0
