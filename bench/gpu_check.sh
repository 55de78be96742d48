#!/usr/bin/env bash
# One prepared GPU check, at most ~8 minutes on an H200: on a CUDA machine with PyTorch and Triton already
# installed and no network, install fastdpo (and the peer wheels carried in ./wheels, a folder git ignores:
# trl, liger-kernel, cut-cross-entropy), then, each step under its own time limit and all under one budget:
#   0. bench/static_check.py     every default-path kernel specialization compiled for sm_80 and sm_90 with this
#                                machine's Triton: no spills, shared memory within limits (no GPU time; ~1 min)
#   1. bench/gpu_correctness.py  every path at full size against float64 (default, fused, vocab, tiles + vocab,
#                                the one-pass linear_dpo_loss)
#   2. bench/compare.py          peers side by side: llama3, gemma2, dpo-short, gpu-long, peaked (with and
#                                without gradient filtering, gradient error against float64)
#   3. bench/gpu_tune.py         the forward alone, both designs (Triton kernel, cuBLAS tiles) and the Triton
#                                kernel at its former tiles: share of torch.mm
#   4. the CUDA test subset      the interpreter's kernel tests, compiled for real (whatever budget is left)
# and print a compact summary. Each step's output: its own file under $OUT, and $OUT/gpu_check.log. A step
# cut short by its limit keeps what it printed (compare.py prints each row as its method finishes).
#
#   bash bench/gpu_check.sh [--tune]     # results under ${OUT:-bench/gpu_out}; --tune adds the full sweep
#                                        # (bench/gpu_tune.py, ~3 min more, beyond the budget)
#   BUDGET=470 (seconds, all steps together; the planned limits below add up to it)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
DEADLINE=$((SECONDS + ${BUDGET:-470}))
say() { echo "$*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS FILE CMD...: run with min(SECONDS, what the budget has left), output to FILE and the log
  local name=$1 limit=$2 file=$3; shift 3
  local left=$((DEADLINE - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then say "== $name: skipped (budget spent)"; return; fi
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
# (an old setuptools without bdist_wheel, < 70.1 and no wheel package, cannot: then this checkout goes on
#  PYTHONPATH, so that the measurements still run)
if ! timeout 60 python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
  say "fastdpo install FAILED (see $LOG): using this checkout through PYTHONPATH"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -d wheels ]; then
  timeout 60 python3 -m pip install -q --no-index --no-deps wheels/*.whl >>"$LOG" 2>&1 \
    || say "some peer wheels failed to install"
fi
python3 -m pip list 2>/dev/null | grep -iE "^(fastdpo|trl|liger-kernel|cut-cross-entropy|transformers) " | tee -a "$LOG"

step "static check" 90 static_check.txt python3 bench/static_check.py --jobs "$(nproc)"
step "correctness" 110 correctness.txt python3 bench/gpu_correctness.py
: > "$OUT/results.md"
compare() {  # compare SHAPE SECONDS REPEATS
  step "compare $1" "$2" "compare_$1.txt" python3 bench/compare.py --shape "$1" --repeats "$3" --out "$OUT/results.md"
}
compare llama3 55 10
compare gemma2 45 10
compare dpo-short 60 10
compare gpu-long 60 5
compare peaked 55 5
# (128,256,64,8,3: the tiles before the static check's, the H200's fastest measured; the new default is unmeasured)
step "forward share" 35 forward.txt python3 bench/gpu_tune.py --shapes llama3,gemma2 --forward-only --no-profile \
  --configs "default FASTDPO_FWD=tiles FASTDPO_BLOCKS=128,256,64,8,3"
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")      # pytest-xdist where the machine has it
step "cuda tests" 150 tests.txt env FASTDPO_TEST_CUDA=1 python3 -m pytest -q $XDIST -p no:cacheprovider \
  tests/test_logps.py tests/test_logits_logps.py tests/test_linear_loss.py -k "triton or new_paths or vocab"
if [ "${1:-}" = "--tune" ]; then
  DEADLINE=$((SECONDS + 600))
  step "tune" 600 tune.txt python3 bench/gpu_tune.py
fi

say ""
say "== summary"
tail -n 1 "$OUT/static_check.txt" 2>/dev/null | tee -a "$LOG"
grep -E "^FAIL|failure" "$OUT/correctness.txt" | tee -a "$LOG"
grep -E "^\| |^\*\*|^- input softmax" "$OUT/results.md" | tee -a "$LOG"
grep -E "^\||TFLOP" "$OUT/forward.txt" 2>/dev/null | tee -a "$LOG"
[ -f "$OUT/tune.txt" ] && grep -E "^\||TFLOP" "$OUT/tune.txt" | tee -a "$LOG"
tail -n 1 "$OUT/tests.txt" 2>/dev/null | tee -a "$LOG"
