#!/usr/bin/env bash
# One prepared GPU check: on a CUDA machine with PyTorch and Triton already installed and no network,
# install fastdpo (and the peer wheels carried in ./wheels, a folder git ignores: trl, liger-kernel,
# cut-cross-entropy), then
#   1. bench/gpu_correctness.py  full-size shapes against float64 ground truth (races, big-size bugs)
#   2. bench/compare.py          the peer tables, llama3 and gemma2 heads, bf16
#   3. the CUDA test subset      the interpreter's kernel tests, compiled for real
#   4. bench/gpu_tune.py         tile configurations, forward share, a kernel profile
# and print a compact summary. Each step's output: its own file under $OUT, and $OUT/gpu_check.log.
#
#   bash bench/gpu_check.sh [--no-tune]      # results under ${OUT:-bench/gpu_out}
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS FILE CMD...: run with a time limit, output to FILE and the log
  local name=$1 limit=$2 file=$3; shift 3
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$file" 2>&1
  local rc=$?
  cat "$OUT/$file" >> "$LOG"
  say "== $name: exit $rc in $((SECONDS - t0)) s (limit $limit s) -> $OUT/$file"
}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

say "== $(date -u '+%F %T UTC') commit $(git rev-parse --short HEAD 2>/dev/null || echo none)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  2>&1 | tee -a "$LOG"

# no index, no deps, no build isolation: setuptools is there, the network is not
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
  || { say "fastdpo install FAILED (see $LOG)"; exit 1; }
if [ -d wheels ]; then
  python3 -m pip install -q --no-index --no-deps wheels/*.whl >>"$LOG" 2>&1 || say "some peer wheels failed to install"
fi
python3 -m pip list 2>/dev/null | grep -iE "^(fastdpo|trl|liger-kernel|cut-cross-entropy|transformers) " | tee -a "$LOG"

step "correctness" 90 correctness.txt python3 bench/gpu_correctness.py
: > "$OUT/results.md"
for shape in llama3 gemma2; do
  step "compare $shape" 120 "compare_$shape.txt" python3 bench/compare.py --shape "$shape" --repeats 10 \
    --out "$OUT/results.md"
done
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")      # pytest-xdist where the machine has it
step "cuda tests" 150 tests.txt env FASTDPO_TEST_CUDA=1 python3 -m pytest -q $XDIST -p no:cacheprovider \
  tests/test_logps.py tests/test_logits_logps.py -k triton
if [ "${1:-}" != "--no-tune" ]; then
  step "tune" 150 tune.txt python3 bench/gpu_tune.py
fi

say ""
say "== summary"
grep -E "^FAIL|failure" "$OUT/correctness.txt" | tee -a "$LOG"
grep -E "^\| |^\*\*" "$OUT/results.md" | tee -a "$LOG"
[ -f "$OUT/tune.txt" ] && grep -E "^\||GEMM" "$OUT/tune.txt" | tee -a "$LOG"
tail -n 1 "$OUT/tests.txt" | tee -a "$LOG"
