"""Tile configurations of the linear kernels on the GPU shapes, and where the time goes (needs CUDA).

    python bench/gpu_tune.py [--shapes llama3,gemma2] [--configs "products:default fused:128,128,32,8,3"]

For each shape (bench/compare.py's SHAPES) and each backward mode and FASTDPO_BLOCKS value:
forward-only and fwd+bwd time of fastdpo.sequence_logps inside the DPO
sigmoid loss (median of CUDA-event timings, as compare.py), and the share of
the measured bf16 GEMM rate. Then one profiled fwd+bwd step with the default
configuration: the kernels ranked by GPU time.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import DTYPES, SHAPES, cuda_seconds, gemm_rate, make_problem, measure_cuda  # noqa: E402
from _peers import METHODS  # noqa: E402

# FASTDPO_BWD:FASTDPO_BLOCKS ("default": unset)
CONFIGS = "products:default products:128,256,32,8,3 products:128,128,32,8,3 products:128,256,64,8,3 fused:default"


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
    p.add_argument("--configs", default=CONFIGS,
                   help="space-separated FASTDPO_BWD:FASTDPO_BLOCKS settings ('default': FASTDPO_BLOCKS unset)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        dtype = DTYPES[shape.dtype]
        useful = 4 * 2 * shape.scored * shape.D * shape.V
        rate = gemm_rate(shape, dtype, "cuda")
        print(f"\n{name}: bf16 GEMM {rate / 1e12:.0f} TFLOP/s; useful fwd+bwd {useful / 1e12:.1f} TFLOP", flush=True)
        print("| FASTDPO_BWD | FASTDPO_BLOCKS | fwd ms | fwd+bwd ms | % of GEMM | peak growth MB |", flush=True)
        print("|---|---|---:|---:|---:|---:|", flush=True)
        for setting in args.configs.split():
            bwd, config = setting.split(":")
            os.environ["FASTDPO_BWD"] = bwd
            os.environ.pop("FASTDPO_BLOCKS", None)
            if config != "default":
                os.environ["FASTDPO_BLOCKS"] = config
            pb = make_problem(shape, dtype, "cuda")
            try:
                r = measure_cuda(lambda: METHODS["fastdpo"].loss(pb).backward(), args.repeats)
                fwd = forward_seconds(pb, args.repeats)
                print(f"| {bwd} | {config} | {fwd * 1e3:.1f} | {r['s'] * 1e3:.1f} | {useful / r['s'] / rate:.0%} "
                      f"| {r['growth_mb']:,.0f} |", flush=True)
            except Exception as e:  # a configuration that does not compile or fit is a row, not the end
                print(f"| {bwd} | {config} | n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]}) | | | |", flush=True)
            del pb
            torch.cuda.empty_cache()
        os.environ.pop("FASTDPO_BLOCKS", None)
        os.environ.pop("FASTDPO_BWD", None)
        pb = make_problem(shape, dtype, "cuda")
        print(profile_step(pb), flush=True)
        del pb
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
