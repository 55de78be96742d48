#!/usr/bin/env bash
# One prepared GPU check: on a CUDA machine with PyTorch and Triton already installed and no network,
# install fastdpo (and the peer wheels carried in ./wheels, a folder git ignores), run the CUDA test
# subset, then the benchmark tables, and print one compact summary. Everything else goes to $LOG.
#
#   bash bench/gpu_check.sh            # results under ${OUT:-bench/gpu_out}
#
# Not yet run on a GPU (no device has been lent to this project so far): expect to fix it on first use.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }

say "== $(date -u '+%F %T UTC') commit $(git rev-parse --short HEAD 2>/dev/null || echo none)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"

# 1. install: no index, no deps, no build isolation (setuptools is there; the network is not)
pip install --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { say "fastdpo install FAILED"; exit 1; }
if [ -d wheels ]; then
  pip install --no-index --no-deps wheels/*.whl >>"$LOG" 2>&1 || say "some peer wheels failed to install (see log)"
fi

# 2. the CUDA test subset: the same tests, kernels compiled for real (no interpreter)
#    (the files whose tests take the `device` fixture; the loss tests still build CPU tensors)
FASTDPO_TEST_CUDA=1 timeout 240 python -m pytest -q tests/test_logps.py tests/test_logits_logps.py \
  -k triton >>"$LOG" 2>&1
say "tests: $(tail -n 1 "$LOG")"

# 3. the benchmark tables (bf16; each method in its own process)
for shape in llama3 gemma2; do
  timeout 150 python bench/compare.py --shape "$shape" --repeats 10 --out "$OUT/results.md" >>"$LOG" 2>&1 \
    || say "compare.py --shape $shape did not finish (see log)"
done
say "== tables: $OUT/results.md"
cat "$OUT/results.md" 2>/dev/null
