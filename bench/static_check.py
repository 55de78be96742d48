"""Static GPU check: every Triton kernel specialization fastdpo's launchers produce, compiled for sm_80 and
sm_90 with the real Triton compiler and the ptxas of Triton's wheel. No GPU and no driver needed.

    python bench/static_check.py            # the default paths (what CI runs: tests/test_static_compile.py)
    python bench/static_check.py --full     # every path, dtype, switch and constexpr combination
    python bench/static_check.py --targets 90 --jobs 16

How the specializations are found: the launchers in kernels/ run on meta tensors (shapes, no data) for
representative heads (Llama-3 D 4096 V 128256, Gemma-2 with softcap D 3584 V 256000, GPT-2's unaligned
V 50257), with Triton's driver replaced by a compile-only stand-in for each target. Each launch goes
through Triton's own argument binding, heuristics and specialization; ``knobs.runtime.jit_cache_hook``
records it instead of compiling, and the recorded specializations are then compiled (``JITFunction.preload``)
in parallel. So the list is what the launchers pass, never a hand-written copy of it.

Fails (exit 1) on a compile error, any register spill (local memory), or shared memory beyond the target's
limit (sm_80: 166,912 B, sm_90: 232,448 B). Exit 2: Triton's CUDA backend or ptxas is missing here.
Prints one table: kernel, specialization, target, registers, spills, shared memory, and where it came from.
TRITON_INTERPRET must be unset (Triton reads it at import): the script restarts itself without it.
"""
from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET"):      # tests/conftest.py sets it; the interpreter compiles nothing
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
              {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})

import argparse  # noqa: E402
import contextlib  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass(frozen=True)
class Target:
    cc: int
    sms: int              # multiprocessors of the card the launchers plan for (A100, H100/H200)
    shared: int           # bytes of shared memory a block may opt into


TARGETS = {80: Target(80, 108, 163 * 1024), 90: Target(90, 132, 227 * 1024)}
# name: (D, V, softcap)
HEADS = {"llama3": (4096, 128256, None), "gemma2": (3584, 256000, 30.0), "gpt2": (768, 50257, None)}
# scored tokens: bench/compare.py's llama3 batch (4 x 3072), and one not a multiple of 16 (Triton
# specializes integer arguments on divisibility by 16)
TOKENS = (12288, 12281)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def unavailable() -> str | None:
    """Why Triton cannot compile for CUDA here, or None."""
    try:
        from triton import knobs
        from triton.backends import backends
    except ImportError as e:
        return f"triton: {e}"
    if "nvidia" not in backends:
        return "Triton has no CUDA backend"
    for tool in ("ptxas", "cuobjdump"):
        try:
            path = getattr(knobs.nvidia, tool).path
            subprocess.run([path, "--version"], check=True, capture_output=True, timeout=60)
        except Exception as e:   # noqa: BLE001 (any failure means: cannot compile here)
            return f"{tool} from Triton's wheel does not run: {e}"
    return None


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: the current device is a target, kernels compile and never run."""

    def __init__(self, cc: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", cc, 32)
        self.cc = cc

    def get_current_device(self):
        return self.cc

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("meta")


@dataclass
class Spec:
    fn: object            # the JITFunction
    cc: int
    data: str             # Triton's specialization data (JSON), what preload compiles
    label: str
    sources: set = field(default_factory=set)


SPECS: dict = {}          # (kernel, cc, Triton's cache key) -> Spec
_SOURCE = ["", 0]         # the case being observed, the target


def _record(*, key, fn, compile, **_):
    """jit_cache_hook: remember the specialization, skip the compilation (and so the launch)."""
    import json
    jf = fn.jit_function
    spec = SPECS.get((fn.name, _SOURCE[1], key))
    if spec is None:
        data = json.loads(compile["specialization_data"])
        spec = SPECS[(fn.name, _SOURCE[1], key)] = Spec(jf, _SOURCE[1], compile["specialization_data"],
                                                        _label(jf, data))
    spec.sources.add(_SOURCE[0])
    return True


def _label(jf, data) -> str:
    """'bf16 HAS_BIAS=0 ... 128x128x64 w8 s3 N,V%16': the pointer dtype, the constexprs (UPCAST, the
    interpreter's, left out), tiles, warps, stages, and the integer arguments not specialized as multiples of 16."""
    names = jf.arg_names
    sig = data["signature"]
    ptr = next((t[1:] for t in sig.values() if isinstance(t, str) and t.startswith("*")), "")
    consts = {names[k[0]]: v for k, v in zip(data["constant_keys"], data["constant_vals"]) if len(k) == 1}
    divisible = {names[k[0]] for k, v in zip(data["attrs_keys"], data["attrs_vals"])
                 if len(k) == 1 and "tt.divisibility" in str(v)}
    unaligned = [n for n, t in sig.items() if t in ("i32", "i64") and n not in divisible]
    ones = [f"{n}=1" for n, v in consts.items() if n.upper() != n and v == 1]
    flags = [f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in consts.items()
             if n.upper() == n and v is not None and not n.startswith("BLOCK") and n != "UPCAST"]
    blocks = "x".join(str(consts[n]) for n in ("BLOCK_N", "BLOCK_V", "BLOCK_D", "BLOCK") if n in consts)
    opts = data["options"]
    return " ".join([ptr, *flags, blocks, f"w{opts['num_warps']}", f"s{opts['num_stages']}", *ones]
                    + ([",".join(unaligned) + "%16"] if unaligned else []))


@contextlib.contextmanager
def env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


SWITCHES = ("FASTDPO_FWD", "FASTDPO_BWD", "FASTDPO_ONE_PASS", "FASTDPO_BLOCKS", "FASTDPO_SLICE_MB")


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def cases(full: bool):
    """(label, switches, thunk): each thunk runs launchers on meta tensors."""
    from fastdpo.kernels import dpo_loss, logits_logps, logps, tiles
    from fastdpo.loss import F_DIVERGENCE_LOSSES
    heads = HEADS.items()
    dtypes = DTYPES.items()
    for (head, (D, V, cap)), (dt, dtype), N, bias in ((h, d, n, b) for h in heads for d in dtypes for n in TOKENS
                                                      for b in ((False, True) if full else (False,))):
        w = meta(V, D, dtype=dtype)
        b = meta(V, dtype=dtype) if bias else None
        h = meta(N + 5, D, dtype=dtype)
        rows, y = meta(N, dtype=torch.int64), meta(N, dtype=torch.int64)
        lse, g = meta(N), meta(N)
        kw = dict(softcap=cap)
        name = f"{head}{'+bias' if bias else ''} {dt} N{N}"
        fwds = ("triton", "tiles") if full else ("triton",)
        for mode in fwds:
            if mode == "tiles" and dtype == torch.float32:
                continue
            yield f"{name} fwd {mode}", dict(FASTDPO_FWD=mode), lambda: logps.logps_fwd(h, w, b, rows, y, **kw)
        needs = [(dh, dw, db) for dh in (0, 1) for dw in (0, 1) for db in ((0, 1) if bias else (0,))
                 if dh or dw or db]
        bwds = [("products", (1, 1, int(bias)), None, False)]
        if full:
            bwds += [("vocab", n, None, False) for n in needs]
            eps = [None] if dtype == torch.float32 else [None, torch.finfo(dtype).eps / 32]
            bwds += [("fused", n, e, det) for n in needs for e in eps for det in (False, True)]
        for mode, (dh, dw, db), eps, det in bwds:
            yield (f"{name} bwd {mode}{' filter' if eps else ''}{' deterministic' if det else ''}",
                   dict(FASTDPO_BWD=mode),
                   lambda dh=dh, dw=dw, db=db, eps=eps, det=det: logps.logps_bwd(
                       h, w, b, rows, y, lse, g, need_dh=bool(dh), need_dw=bool(dw), need_db=bool(db),
                       filter_eps=eps, deterministic=det, **kw))
        if not bias:
            # sequence_logps_from_logits: the fold kernels on the model's logits [M, V]
            x = meta(N + 5, V, dtype=dtype)
            yield f"{name} logits", {}, lambda: (
                logits_logps.logits_logps_fwd(x, rows, y, **kw),
                logits_logps.logits_logps_bwd(x, meta(N + 5, dtype=torch.int64), meta(N + 5), meta(N + 5),
                                              ignore_index=-100, **kw))
        if full and dtype != torch.float32:
            # the one-pass linear_dpo_loss: fp32 logits of a chunk of whole pairs, folded and differentiated
            n = 2 * 768 - (N % 16)                  # two dpo-short pairs (768 scored tokens each), or not aligned
            xc = meta(n, V)
            yield f"{name} one-pass", {}, lambda: (
                tiles.chunk_logits(h, w, b, rows[:n], y[:n], xc, **kw),
                tiles.chunk_grads(xc, meta(n, D, dtype=dtype), w, b, y[:n], lse[:n], g[:n], dh=meta(n, D),
                                  dw=meta(V, D), db=meta(V) if bias else None, **kw))
    # the per-pair losses: every loss; every f-divergence where allowed; reference and lengths given or not
    combos = [("sigmoid", "reverse_kl", True, True)]
    if full:
        combos = [(loss, fdiv, ref, lens) for loss in dpo_loss.LOSS_IDS for fdiv in dpo_loss.FDIV_IDS
                  for ref in (False, True) for lens in (False, True)
                  if fdiv == "reverse_kl" or (loss in F_DIVERGENCE_LOSSES and ref)]
    for B in (2, 4096):
        p = meta(B)
        for loss, fdiv, ref, lens in combos:
            if B > 2 and (loss, fdiv) != ("sigmoid", "reverse_kl"):
                continue
            yield (f"dpo_loss {loss} {fdiv}{' ref' if ref else ''}{' lengths' if lens else ''} B{B}", {},
                   lambda p=p, loss=loss, fdiv=fdiv, ref=ref, lens=lens: dpo_loss.dpo_pair_loss(
                       p, p, p if ref else None, p if ref else None, p if lens else None, p if lens else None,
                       loss_type=loss, f_divergence_type=fdiv, beta=0.1, label_smoothing=0.0, gamma=0.0,
                       discopop_tau=0.05, f_alpha_divergence_coef=0.5))


def collect(full: bool, targets, blocks=(), only=""):
    """Run every case's launchers for each target with compilation replaced by a record of what it would compile."""
    from triton import knobs
    from triton.runtime.driver import driver
    from fastdpo.kernels import config
    knobs.runtime.jit_cache_hook = _record
    try:
        for t in targets:
            driver.set_active(CompileOnlyDriver(t.cc))
            _SOURCE[1] = t.cc
            with _as_cuda(config, t):
                for extra in ({}, *({"FASTDPO_BLOCKS": b} for b in blocks)):
                    for label, switches, thunk in cases(full):
                        if re.search(only, label):
                            _SOURCE[0] = label + "".join(f" {k}={v}" for k, v in extra.items())
                            with env(**{**{s: None for s in SWITCHES}, **switches, **extra}):
                                thunk()
    finally:
        knobs.runtime.jit_cache_hook = None
        driver.set_active(None)      # back to the real one, found when next asked for
    return list(SPECS.values())


@contextlib.contextmanager
def _as_cuda(config, target: Target):
    """The launchers plan for a CUDA device of this target (the meta tensors' device is 'meta')."""
    old = config.multiprocessors
    config.multiprocessors = lambda device: target.sms
    try:
        yield
    finally:
        config.multiprocessors = old


_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _compile(i):
    from triton import knobs
    from triton.runtime.driver import driver
    spec = _TODO[i]
    driver.set_active(CompileOnlyDriver(spec.cc))
    t0 = time.time()
    try:
        kernel = spec.fn.preload(spec.data)
    except Exception as e:   # noqa: BLE001 (a compile error is a finding)
        return i, dict(error=(str(e).strip().splitlines() or [type(e).__name__])[0][:200], seconds=time.time() - t0)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    reg, stack, _, local = (int(x) for x in _RES.search(out).groups())
    return i, dict(regs=reg, spill=max(stack, local), shared=kernel.metadata.shared, seconds=time.time() - t0)


_TODO: list = []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every path and switch (the default: the default paths)")
    p.add_argument("--targets", default="80,90", help="compute capabilities, e.g. 80,90")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compilations")
    p.add_argument("--blocks", default="", help="FASTDPO_BLOCKS values to check too, space-separated")
    p.add_argument("--only", default="", help="a regular expression: the cases whose label it matches "
                                              "(e.g. 'llama3 bf16 .* fwd')")
    args = p.parse_args(argv)
    why = unavailable()
    if why:
        print(f"static check unavailable: {why}")
        return 2
    import triton
    targets = [TARGETS[int(cc)] for cc in args.targets.split(",")]
    t0 = time.time()
    specs = collect(args.full, targets, args.blocks.split(), args.only)
    _TODO[:] = sorted(specs, key=lambda s: (s.fn.__name__ != "_logps_bwd_kernel", s.fn.__name__, s.label))
    print(f"{len(specs)} specializations from the launchers in {time.time() - t0:.1f} s; compiling with Triton "
          f"{triton.__version__}, {args.jobs} jobs", flush=True)
    results = [None] * len(_TODO)
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for done, (i, r) in enumerate(pool.imap_unordered(_compile, range(len(_TODO))), 1):
            results[i] = r
            if _problems(_TODO[i], r):            # as they come: a long sweep shows its findings early
                print(f"FAIL {_TODO[i].fn.__name__} {_TODO[i].label} sm_{_TODO[i].cc}: "
                      f"{', '.join(_problems(_TODO[i], r))} ({_sources(_TODO[i].sources)})", flush=True)
            if done % 100 == 0:
                print(f"{done}/{len(_TODO)} compiled, {time.time() - t0:.0f} s", flush=True)
    failures = 0
    rows = []
    for spec, r in zip(_TODO, results):
        problems = _problems(spec, r)
        failures += bool(problems)
        rows.append((spec.fn.__name__, spec.label, f"sm_{spec.cc}", str(r.get("regs", "-")), str(r.get("spill", "-")),
                     str(r.get("shared", "-")), "FAIL: " + ", ".join(problems) if problems else "ok",
                     f"{r['seconds']:.1f}", _sources(spec.sources)))
    header = ("kernel", "specialization", "target", "registers", "spill B", "shared B", "status", "s", "from")
    widths = [max(len(x[k]) for x in (header, *rows)) for k in range(len(header) - 1)]
    for row in (header, *rows):
        print("  ".join(c.ljust(wd) for c, wd in zip(row, widths)) + "  " + row[-1])
    print(f"\n{len(rows)} compiled in {time.time() - t0:.0f} s (Triton {triton.__version__}, "
          f"targets {', '.join(f'sm_{t.cc}' for t in targets)}): {failures} failing")
    return 1 if failures else 0


def _problems(spec: Spec, r: dict) -> list:
    if "error" in r:
        return [r["error"]]
    return (["spills"] if r["spill"] else []) + (["shared memory"] if r["shared"] > TARGETS[spec.cc].shared else [])


def _sources(sources) -> str:
    s = sorted(sources)
    return s[0] + (f" (+{len(s) - 1} more)" if len(s) > 1 else "")


if __name__ == "__main__":
    sys.exit(main())
