"""fastdpo against its peers in one markdown table: fwd+bwd time, peak memory, share of the GEMM rate.

    python bench/compare.py --shape S1 [--methods naive,cce,liger,trl] [--dtype fp32]
                            [--repeats 3] [--out bench/RESULTS.md] [--error]

Every method (bench/_peers.py) computes a DPO sigmoid loss from the same
hidden [2P, T, D], weight [V, D] and labels (first quarter of each row is
prompt, ignored) and back-propagates into hidden and weight. On the CPU each runs in a fresh
subprocess (``--child METHOD``) so that its resident-memory peak is its own; on
CUDA all run in one process, the allocator's peak reset for each. A method that
fails to import, errors or is killed shows as ``n/a (reason)``. Rows are printed (and
appended to --out) as they finish, so a run cut short keeps the rows it had.

The peaked shapes (``peaked``, ``S1-peaked``) draw hidden states whose softmax is as
concentrated as a trained LM's is assumed to be (``make_problem``; the table's caption
gives the statistics measured on the input) and add each method's gradient error against
float64 (``--error`` adds it to any shape).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _peers import BETA, IGNORE_INDEX, METHODS, Problem, Unsupported, dpo_sigmoid_loss  # noqa: E402

CPU_METHODS = ("fastdpo", "fastdpo_loss", "naive", "trl", "liger", "cce")
# on the GPU: fastdpo's Triton paths (default, FASTDPO_BWD=vocab, FASTDPO_FWD=tiles + vocab) beside the peers
GPU_METHODS = ("fastdpo", "fastdpo_vocab", "fastdpo_tiles", "fastdpo_loss", "naive", "trl", "liger", "cce")

RESULT_TAG = "@@result "
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_STD = 0.03   # logits h.w then have std ~ 0.03 * sqrt(D): about 1 for D 1024
REF_LOGP_STD = 10.0
# Peaked inputs: per token, the target's logit and those of PEAK_CANDIDATES - 1 random other tokens are
# raised above a unit-variance bulk; the target by a margin ~ N(log V + PEAK_MARGIN, PEAK_MARGIN_STD^2),
# the others by that margin less U(0, PEAK_SPREAD). The constants were chosen (not fitted to any model) for
# a mean max-probability of about 0.55, a mean entropy of about 1.6 nats and a mean target log-prob of
# about -1.2 (perplexity ~3.3), which we assume typical of a trained LM on in-distribution text.
PEAK_CANDIDATES, PEAK_MARGIN, PEAK_MARGIN_STD, PEAK_SPREAD = 8, 4.25, 2.0, 6.0
STATS_TOKENS = 512                      # scored tokens the caption's softmax statistics are measured on
FILTER_TILE = (128, 256)                # the bf16 kernels' BLOCK_N x BLOCK_V on the GPU (kernels/config.py)
CHILD_TIMEOUT_S = 3600
# Every allocation above 1 MiB gets its own mmap, so a freed tensor leaves the
# resident set at once and a later step cannot reuse it unseen (glibc otherwise
# keeps up to 32 MiB blocks in its heap, hiding part of the next step's peak).
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


@dataclass(frozen=True)
class Shape:
    pairs: int
    T: int
    D: int
    V: int
    dtype: Optional[str] = None       # None: fp32 on CPU, bf16 on CUDA
    softcap: Optional[float] = None
    cuda_only: bool = False
    methods: tuple = CPU_METHODS      # run when --methods is not given
    peaked: bool = False              # hidden states with a trained-LM-like softmax (make_problem)
    error: bool = False               # also each method's gradient error against float64

    @property
    def rows(self) -> int:
        return 2 * self.pairs

    @property
    def prompt(self) -> int:
        return self.T // 4

    @property
    def scored(self) -> int:
        return self.rows * (self.T - self.prompt)


SHAPES = {
    "S1": Shape(pairs=2, T=512, D=1024, V=32000),
    "S2": Shape(pairs=1, T=4096, D=1024, V=32000),
    # naive PyTorch would need > 20 GB here: fastdpo only unless --methods says otherwise
    "long": Shape(pairs=1, T=32768, D=1024, V=32000, methods=("fastdpo",)),
    "S1-peaked": Shape(pairs=2, T=512, D=1024, V=32000, peaked=True, error=True, methods=("fastdpo", "naive", "cce")),
    "llama3": Shape(pairs=2, T=4096, D=4096, V=128256, dtype="bf16", cuda_only=True, methods=GPU_METHODS),
    "gemma2": Shape(pairs=1, T=4096, D=2304, V=256000, dtype="bf16", softcap=30.0, cuda_only=True,
                    methods=GPU_METHODS),
    # the common DPO batch: linear_dpo_loss (the one pass applies: 768 scored tokens a pair)
    "dpo-short": Shape(pairs=16, T=512, D=4096, V=128256, dtype="bf16", cuda_only=True, methods=(
        "fastdpo_loss", "fastdpo_loss_1p", "fastdpo_loss_tiles", "fastdpo", "fastdpo_tiles", "trl", "liger", "cce",
        "naive")),
    # naive (~100 GB) and Liger (whole-pair chunks) left out
    "gpu-long": Shape(pairs=1, T=32768, D=4096, V=128256, dtype="bf16", cuda_only=True, methods=(
        "fastdpo", "fastdpo_vocab", "fastdpo_tiles", "cce", "trl")),
    "peaked": Shape(pairs=1, T=4096, D=4096, V=128256, dtype="bf16", cuda_only=True, peaked=True, error=True,
                    methods=("fastdpo", "fastdpo_vocab", "fastdpo_unfiltered", "fastdpo_fused", "cce", "naive")),
}


# ---------------------------------------------------------------- child: one method, one process

def make_problem(shape: Shape, dtype: torch.dtype, device: str) -> Problem:
    torch.manual_seed(0)
    if shape.peaked:
        labels = torch.randint(0, shape.V, (shape.rows, shape.T), device=device)
        hidden, weight = peaked_inputs(labels.view(-1), shape.D, shape.V)
        hidden = hidden.view(shape.rows, shape.T, shape.D)
    else:                                       # (the draws in the order of the recorded runs)
        hidden = torch.randn(shape.rows, shape.T, shape.D, device=device)
        weight = torch.randn(shape.V, shape.D, device=device) * WEIGHT_STD
        labels = torch.randint(0, shape.V, (shape.rows, shape.T), device=device)
    labels[:, :shape.prompt] = IGNORE_INDEX
    ref = torch.randn(2, shape.pairs, device=device) * REF_LOGP_STD
    return Problem(hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), labels, ref[0], ref[1],
                   shape.softcap)


def peaked_inputs(targets: torch.Tensor, D: int, V: int, chunk: int = 4096):
    """(hidden [N, D], weight [V, D]) fp32 for targets [N]: weight ~ N(0, 1/D), so that the bulk logits
    u . w_v of h = u + sum_j m_j w_j / |w_j|^2 (u ~ N(0, I)) have unit variance, and the logit of each
    candidate j (the target and PEAK_CANDIDATES - 1 random ids) is raised by its margin m_j (up to the
    candidates' small overlaps)."""
    device, N, K = targets.device, targets.numel(), PEAK_CANDIDATES
    weight = torch.randn(V, D, device=device) / D ** 0.5
    hidden = torch.randn(N, D, device=device)
    for a in range(0, N, chunk):
        y = targets[a:a + chunk]
        n = y.numel()
        cand = torch.cat([y[:, None], torch.randint(0, V, (n, K - 1), device=device)], 1)          # [n, K]
        margin = (math.log(V) + PEAK_MARGIN + PEAK_MARGIN_STD * torch.randn(n, 1, device=device)
                  - torch.cat([torch.zeros(n, 1, device=device), PEAK_SPREAD * torch.rand(n, K - 1, device=device)], 1))
        wc = weight[cand]                                                                          # [n, K, D]
        hidden[a:a + n] += torch.einsum("nk,nkd->nd", margin / wc.square().sum(2), wc)
    return hidden, weight


def softmax_stats(pb: Problem) -> str:
    """The caption line: softmax statistics of the first STATS_TOKENS scored tokens (fp32), and the share of
    FILTER_TILE tiles of |onehot - p| that lie below bf16's filter_eps everywhere (what filtering can skip)."""
    from fastdpo import reference
    mask = pb.labels != IGNORE_INDEX
    h, y = pb.hidden.detach()[mask][:STATS_TOKENS].float(), pb.labels[mask][:STATS_TOKENS]
    z = reference.logit_transform(h @ pb.weight.detach().float().t(), softcap=pb.softcap)         # [n, V]
    logp = z.log_softmax(1)
    p = logp.exp()
    entropy = -(p * logp).sum(1)
    dz = (p - torch.nn.functional.one_hot(y, z.shape[1]).float()).abs()
    bn, bv = FILTER_TILE
    n, V = dz.shape[0] // bn * bn, dz.shape[1] // bv * bv
    tiles = dz[:n, :V].reshape(n // bn, bn, V // bv, bv).amax((1, 3))
    eps = torch.finfo(torch.bfloat16).eps / 32
    return (f"- input softmax, first {h.shape[0]} scored tokens: mean max-probability {p.max(1).values.mean():.3f}, "
            f"mean entropy {entropy.mean():.2f} nats, mean target log-prob {logp.gather(1, y[:, None]).mean():.2f}, "
            f"target = argmax for {(z.argmax(1) == y).float().mean():.0%}, tokens per row with p > filter_eps "
            f"(bf16: eps/32 = {eps:.1e}) {(p > eps).sum(1).float().mean():.1f}; {(tiles < eps).float().mean():.1%} "
            f"of the {bn}×{bv} tiles of |onehot − p| lie below filter_eps everywhere (what filtering can skip).")


def rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_rss_kb() -> int:
    """VmHWM: the kernel's resident high-water mark (what ru_maxrss reports, unless a thread has exited)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> bool:
    """Lower the high-water mark to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_cpu(step, repeats: int) -> dict:
    """Median fwd+bwd time, and peak RSS growth over the RSS once inputs and their .grad exist."""
    step()                                  # warm-up: compiles, allocates hidden.grad / weight.grad
    base_kb = rss_kb()
    clean = reset_peak_rss()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_kb = peak_rss_kb()
    return {"s": statistics.median(times), "growth_mb": (peak_kb - base_kb) / 1024, "peak_clean": clean}


def measure_cuda(step, repeats: int) -> dict:
    """Median fwd+bwd time by CUDA events; peak allocated growth over inputs + .grad."""
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    growth_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"s": cuda_seconds(step, repeats), "growth_mb": growth_mb, "peak_clean": True}


def cuda_seconds(step, repeats: int) -> float:
    """Median of `repeats` CUDA-event timings of step() (warmed up by the caller)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


_TRUTH = {}     # (shape, dtype) -> float64 gradients of the shared loss (one per process)


def float64_grads(pb: Problem, key) -> tuple:
    """d loss / d (hidden, weight) in float64 on the same rounded inputs (fastdpo.reference)."""
    if key not in _TRUTH:
        from fastdpo import reference
        h, w = (t.detach().double().requires_grad_() for t in (pb.hidden, pb.weight))
        logps = reference.sequence_logps(h, w, pb.labels, ignore_index=IGNORE_INDEX, softcap=pb.softcap)
        dpo_sigmoid_loss(logps, pb).backward()
        _TRUTH.clear()
        _TRUTH[key] = (h.grad, w.grad)
    return _TRUTH[key]


def grad_errors(method, pb: Problem, key) -> dict:
    """Max |grad - float64 grad| / max |float64 grad|, for d hidden and d weight, of one fresh step."""
    if not method.same_loss:
        return {}
    truth = float64_grads(pb, key)
    pb.hidden.grad, pb.weight.grad = None, None
    method.loss(pb).backward()
    return {f"err_{name}": ((g.double() - t).abs().max() / t.abs().max()).item()
            for name, g, t in (("h", pb.hidden.grad, truth[0]), ("w", pb.weight.grad, truth[1]))}


def run_child(args) -> dict:
    shape, device = SHAPES[args.shape], args.device
    pb = make_problem(shape, DTYPES[args.dtype], device)
    method = METHODS[args.child]
    losses = []

    def step():
        loss = method.loss(pb)
        loss.backward()
        losses.append(loss.item())

    measure = measure_cuda if device == "cuda" else measure_cpu
    result = measure(step, args.repeats)
    grads = (pb.hidden.grad, pb.weight.grad)
    result["grad_mb"] = sum(g.numel() * g.element_size() for g in grads if g is not None) / 2**20
    result["loss"] = losses[0]
    if args.error:
        result.update(grad_errors(method, pb, (args.shape, args.dtype)))
    return result


def attempt(args) -> dict:
    try:
        return run_child(args)
    except Unsupported as e:
        return {"error": str(e)}
    except Exception as e:  # any failure of a peer becomes its row's reason
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:100]}


def child_main(args) -> None:
    print(RESULT_TAG + json.dumps(attempt(args)), flush=True)


def run_here(method: str, args) -> dict:
    """CUDA: every method in this process, its environment set around it; the allocator's peak is
    reset for each (measure_cuda)."""
    saved = {name: os.environ.get(name) for name, _ in METHODS[method].env}
    os.environ.update(dict(METHODS[method].env))
    try:
        result = attempt(argparse.Namespace(**{**vars(args), "child": method}))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------- parent: spawn, collect, print

def spawn(method: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--shape", args.shape,
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--device", args.device]
    if args.error:
        cmd.append("--error")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                              env={**os.environ, **CHILD_ENV, **dict(METHODS[method].env)})
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {CHILD_TIMEOUT_S} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    if proc.returncode == -9:
        return {"error": "killed (SIGKILL: out of memory?)"}
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"error": tail[:100]}


def gemm_rate(shape: Shape, dtype: torch.dtype, device: str, repeats: int = 10) -> float:
    """Matmul FLOP/s, median: torch.mm of [2048, D] by [n, D]ᵀ into a preallocated [2048, n], n = min(V, 32768),
    in the run's dtype (the layout of hidden @ weight.T)."""
    m, n = 2048, min(shape.V, 32768)
    a = torch.randn(m, shape.D, device=device).to(dtype)
    w = torch.randn(n, shape.D, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, w.t(), out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * m * shape.D * n / statistics.median(times[1:])


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                     platform.processor())
    return f"{model}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "none"
    except OSError:
        return "none"


def header(args, methods) -> str:
    packages = ["torch", "triton"] + [METHODS[m].package for m in methods if METHODS[m].package != "torch"]
    versions = ", ".join(f"{p} {version(p)}" for p in dict.fromkeys(packages))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{device_name(args.device)}; {versions}; commit {git_commit()}; {date}"


def row(method: str, r: dict, useful_flops: float, rate: float, device: str, error: bool) -> str:
    m = METHODS[method]
    if "error" in r:
        blank = " | |" if error else ""
        return f"| {m.title} | n/a ({r['error'].replace('|', '/')}) | | | | {m.products[device]} | |{blank} {m.note} |"
    achieved = useful_flops / r["s"]
    growth = f"{r['growth_mb']:,.0f}" + ("" if r["peak_clean"] else " †")
    errors = ""
    if error:
        errors = " | ".join(f"{r[k]:.2e}" if k in r else "n/a" for k in ("err_h", "err_w")) + " | "
    return (f"| {m.title} | {r['s'] * 1e3:,.1f} | {growth} | {achieved / 1e9:,.1f} | {achieved / rate:.0%} "
            f"| {m.products[device]} | {r['loss']:.4f} | {errors}{m.note} |")


def caption(args, results, rates, useful: float, stats: Optional[str]) -> list:
    s = SHAPES[args.shape]
    grad_mb = next((r["grad_mb"] for r in results.values() if "grad_mb" in r), None)
    grad = "n/a" if grad_mb is None else f"{grad_mb:,.0f} MB"
    if args.device == "cuda":
        timer = "CUDA events"
        memory = "torch.cuda.max_memory_allocated during one step minus memory_allocated before it"
    else:
        timer = "time.perf_counter"
        memory = ("peak RSS (VmHWM, the high-water mark that ru_maxrss reads, reset after the warm-up via "
                  "/proc/self/clear_refs) minus the RSS before the first timed step; † = reset refused, so the "
                  "peak includes the warm-up")
    return [
        f"- fwd+bwd: the DPO sigmoid loss (beta {BETA}, fixed random reference log-probs), forward and backward "
        f"w.r.t. hidden and weight; median of {args.repeats} steps ({timer}) after the warm-up; "
        + ("all methods in one process, in turn." if args.device == "cuda" else "each method in a fresh process."),
        f"- peak growth: {memory}. The baseline holds the inputs and their .grad buffers (allocated by the "
        f"warm-up; the timed steps accumulate into them): hidden.grad + weight.grad = {grad}, so a fused method "
        f"should stay within that + 256 MB.",
        f"- GFLOP/s = useful FLOPs / time, useful FLOPs = 4 × 2·N_scored·D·V = {useful / 1e9:,.1f} GFLOP "
        f"(forward product, one recompute, two gradient products, scored tokens only), whatever a method executes; "
        f"a method that keeps its logits instead of recomputing them can pass 100% of GEMM.",
        f"- % of GEMM: against torch.mm measured in this run ([2048×{s.D}]·[{min(s.V, 32768)}×{s.D}]ᵀ, "
        f"{args.dtype}, median of 10): {rates[0] / 1e9:,.1f} GFLOP/s before the methods ran, "
        f"{rates[1] / 1e9:,.1f} after; the rows use the rate before (each row is printed as its method finishes).",
        "- matmul products: what each method executes per step (from its source), each 2·n·D·V FLOPs with "
        "n = all N tokens or the scored ones.",
        *(["- d hidden / d weight error: max |grad − float64 grad| / max |float64 grad| of one fresh step, the "
           "float64 gradients (fastdpo.reference) taken on the same rounded inputs; the naive row is the plain "
           "computation in the input dtype."] if args.error else []),
        *([stats] if stats else []),
    ]


def useful_flops(shape: Shape) -> float:
    return 4 * 2 * shape.scored * shape.D * shape.V


def table_head(args, methods) -> str:
    s = SHAPES[args.shape]
    softcap = f", softcap {s.softcap:g}" if s.softcap else ""
    peaked = ", peaked softmax" if s.peaked else ""
    errors = " d hidden error | d weight error |" if args.error else ""
    return "\n".join([
        f"**{args.shape}**: {s.pairs} pair(s) × T {s.T} (N {s.rows * s.T}, {s.scored} scored), D {s.D}, "
        f"V {s.V}, {args.dtype}{softcap}{peaked}, {args.device}",
        "",
        header(args, methods),
        "",
        f"| method | fwd+bwd ms | peak growth MB | GFLOP/s | % of GEMM | matmul products | loss |{errors} notes |",
        "|---|---:|---:|---:|---:|---|---:|" + ("---:|---:|" if args.error else "") + "---|",
    ])


def emit(text: str, out: Optional[str]) -> None:
    """Print a part of the table now (and append it to --out), so that a run cut short keeps it."""
    print(text, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="S1")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (default: the shape's)")
    p.add_argument("--dtype", choices=DTYPES, help="default: the shape's, else fp32 on CPU, bf16 on CUDA")
    p.add_argument("--repeats", type=int, help="timed steps per method (default 3 on CPU, 10 on CUDA)")
    p.add_argument("--out", help="also append the table to this file")
    p.add_argument("--error", action="store_true", help="add each method's gradient error against float64 "
                   "(on by default for the peaked shapes)")
    p.add_argument("--device", choices=("cpu", "cuda"), help=argparse.SUPPRESS)
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if shape.cuda_only and args.device != "cuda":
        p.error(f"shape {args.shape} is a GPU shape; this machine has no CUDA device")
    args.dtype = args.dtype or shape.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.repeats = args.repeats or (10 if args.device == "cuda" else 3)
    args.error = args.error or shape.error
    methods = args.methods.split(",") if args.methods else list(shape.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    return args, methods


def main(argv=None) -> None:
    args, methods = parse_args(argv)
    if args.child:
        return child_main(args)
    shape, dtype = SHAPES[args.shape], DTYPES[args.dtype]
    stats = softmax_stats(make_problem(shape, dtype, args.device)) if shape.peaked else None
    rate_before = gemm_rate(shape, dtype, args.device)
    emit(table_head(args, methods), args.out)
    run = run_here if args.device == "cuda" else spawn
    results = {}
    for m in methods:
        results[m] = run(m, args)
        emit(row(m, results[m], useful_flops(shape), rate_before, args.device, args.error), args.out)
    rates = (rate_before, gemm_rate(shape, dtype, args.device))
    emit("\n" + "\n".join(caption(args, results, rates, useful_flops(shape), stats)) + "\n", args.out)


if __name__ == "__main__":
    main()
