"""fastdpo's Triton paths and tile configurations on the GPU shapes, and where the time goes (needs CUDA).

    python bench/gpu_tune.py [--shapes llama3,gemma2] [--configs "default FASTDPO_BWD=vocab ..."]
                             [--forward-only] [--no-profile]

A configuration is a set of fastdpo switches, ``NAME=VALUE`` joined by ``;`` (``default``: none set),
e.g. ``FASTDPO_FWD=tiles;FASTDPO_BWD=vocab`` or ``FASTDPO_BLOCKS=128,256,32,8,3``. For each shape
(bench/compare.py's SHAPES) and configuration: forward-only time of fastdpo.sequence_logps and its
share of the torch.mm rate measured in the same run (the forward is one product, 2·N_scored·D·V
FLOPs), and unless --forward-only the fwd+bwd time inside the DPO sigmoid loss (median of CUDA-event
timings, as compare.py), its share of the rate for four products, and the peak memory growth. Then,
without --no-profile, one profiled fwd+bwd step with the default configuration.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import DTYPES, SHAPES, cuda_seconds, gemm_rate, make_problem, measure_cuda  # noqa: E402
from _peers import METHODS  # noqa: E402

CONFIGS = ("default FASTDPO_BWD=vocab FASTDPO_FWD=tiles;FASTDPO_BWD=vocab FASTDPO_SLICE_MB=64;FASTDPO_BWD=vocab "
           "FASTDPO_SLICE_MB=256;FASTDPO_BWD=vocab FASTDPO_BLOCKS=128,256,32,8,3 FASTDPO_BLOCKS=128,256,64,8,3 "
           "FASTDPO_BWD=fused")
SWITCHES = ("FASTDPO_FWD", "FASTDPO_BWD", "FASTDPO_BLOCKS", "FASTDPO_SLICE_MB")


def set_config(config: str) -> None:
    for name in SWITCHES:
        os.environ.pop(name, None)
    if config != "default":
        os.environ.update(dict(item.split("=", 1) for item in config.split(";")))


def forward_seconds(pb, repeats: int) -> float:
    import fastdpo

    def fwd():
        with torch.no_grad():
            fastdpo.sequence_logps(pb.hidden, pb.weight, pb.labels, softcap=pb.softcap)
    fwd()
    return cuda_seconds(fwd, repeats)


def profile_step(pb) -> str:
    from torch.profiler import ProfilerActivity, profile
    loss_fn = METHODS["fastdpo"].loss
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss_fn(pb).backward()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="llama3,gemma2")
    p.add_argument("--configs", default=CONFIGS, help="space-separated configurations (see above)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--forward-only", action="store_true", help="time the forward only")
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        dtype = DTYPES[shape.dtype]
        product = 2 * shape.scored * shape.D * shape.V
        rate = gemm_rate(shape, dtype, "cuda")
        print(f"\n{name}: {shape.dtype} torch.mm {rate / 1e12:.0f} TFLOP/s; one product {product / 1e12:.1f} TFLOP",
              flush=True)
        print("| configuration | fwd ms | fwd % of torch.mm | fwd+bwd ms | fwd+bwd % (4 products) | peak growth MB |",
              flush=True)
        print("|---|---:|---:|---:|---:|---:|", flush=True)
        for config in args.configs.split():
            set_config(config)
            pb = make_problem(shape, dtype, "cuda")
            try:
                fwd = forward_seconds(pb, args.repeats)
                both = ("| | |" if args.forward_only else None)
                if both is None:
                    r = measure_cuda(lambda: METHODS["fastdpo"].loss(pb).backward(), args.repeats)
                    both = f"| {r['s'] * 1e3:.1f} | {4 * product / r['s'] / rate:.0%} | {r['growth_mb']:,.0f} |"
                print(f"| {config} | {fwd * 1e3:.1f} | {product / fwd / rate:.0%} {both}", flush=True)
            except Exception as e:  # a configuration that does not compile or fit is a row, not the end
                print(f"| {config} | n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]}) | | | | |", flush=True)
            del pb
            torch.cuda.empty_cache()
        set_config("default")
        if not args.no_profile:
            pb = make_problem(shape, dtype, "cuda")
            print(profile_step(pb), flush=True)
            del pb
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
