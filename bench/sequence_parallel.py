"""Peak memory of one training step with sequence parallelism (2 ranks) against one process, by context length.

    nice -n 10 python bench/sequence_parallel.py [--contexts 4k,8k,16k,32k] [--json FILE] [--png FILE]

One pair per step, its prompt 3/4 of the tokens and each reply 1/8 (random token ids), shared prompt in one row,
span attention (the trainer's default on the CPU), no gradient checkpointing (refused under sequence parallelism;
in one process it would take the dense [L, L] mask, 4 GB at 32k in fp32). The step is what ``fastdpo train`` runs per micro-batch: forward + backward of
the model-level DPO loss (``fastdpo.model_pair_dpo_loss``, or ``fastdpo.sequence_parallel.model_pair_dpo_loss``
over 2 ranks under ``torchrun``), the gradients summed over the group, one AdamW step. Each configuration runs in
fresh processes; each process reports its resident memory just before the step (model loaded, batch built, masks
not yet) and its peak resident memory (ru_maxrss) after it: "step peak" = the difference, the memory the step
itself added. The children map allocations from 64 KiB up (``MALLOC``; ``--glibc-default`` leaves glibc as it is),
so that the resident peak is the tensors' peak. Both ranks' log-probs are compared with the single process's
(printed: fp32 sums of thousands of terms, so rounding of ~1e-7 relative).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HIDDEN, LAYERS, HEADS, VOCAB = 256, 4, 8, 32000


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def parse_k(text: str) -> int:
    return int(float(text[:-1]) * 1024) if text.lower().endswith("k") else int(text)


def child(context: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import fastdpo
    from fastdpo.layout import pack_pairs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    group = None
    if world > 1:
        import torch.distributed as dist

        from fastdpo.sequence_parallel import SequenceGroup
        dist.init_process_group("gloo")
        group = SequenceGroup(None, world, dist.get_rank())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=context,
                         attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config).train()
    reply = context // 8
    g = torch.Generator().manual_seed(1)
    prompt, chosen, rejected = (torch.randint(3, VOCAB, (n,), generator=g).tolist()
                                for n in (context - 2 * reply, reply, reply))
    batch = pack_pairs([(prompt, chosen, rejected)], 0, max_tokens=context)
    ref = torch.tensor([-1.0e5]), torch.tensor([-1.0e5 - 1.0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    before = rss_gb()
    start = time.perf_counter()
    if group is None:
        loss, _, logps = fastdpo.model_pair_dpo_loss(model, batch, *ref, return_logps=True)
    else:
        from fastdpo.sequence_parallel import model_pair_dpo_loss
        loss, _, logps = model_pair_dpo_loss(model, batch, *ref, group=group, return_logps=True)
    loss.backward()
    if group is not None:
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad)
    optimizer.step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row = dict(context=context, ranks=world, rank=0 if group is None else group.rank, loss=loss.item(),
               logps=logps.tolist(),
               before_gb=before, peak_gb=peak, step_gb=peak - before, seconds=seconds)
    rows = [row]
    if group is not None:
        rows = [None] * world
        torch.distributed.all_gather_object(rows, row)
    if row["rank"] == 0:
        print("ROWS " + json.dumps(rows))


# glibc's malloc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in its arenas, so the resident
# high-water mark follows the allocator's history, not the tensors alive at the peak (measured, bench/RESULTS.md:
# 2 ranks / 1 process 0.61x and 0.77x at 16k and 32k with glibc's defaults, 0.57x and 0.56x with these). Allocations
# from 64 KiB up are mapped and unmapped with their tensors here, in every configuration alike.
MALLOC = dict(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")


def run(context: int, ranks: int, timeout: int, glibc_default: bool = False) -> list:
    env = dict(os.environ, TQDM_DISABLE="1", **({} if glibc_default else MALLOC))
    if ranks == 1:
        command = [sys.executable, __file__, "--child", str(context)]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // ranks))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                   str(29800 + os.getpid() % 100), __file__, "--child", str(context)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ROWS ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{context} tokens, {ranks} ranks: failed ({proc.returncode})\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][5:])


def plot(rows: list, png: str) -> None:
    """Step peak against context, per number of ranks (for 2 ranks the larger of the two; a context measured twice:
    the last run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for ranks in sorted({r["ranks"] for r in rows}):
        peaks = {}
        for r in rows:
            if r["ranks"] == ranks:
                runs = peaks.setdefault(r["context"], [[]])
                if len(runs[-1]) == ranks:
                    runs.append([])
                runs[-1].append(r["step_gb"])
        points = sorted((c, max(runs[-1])) for c, runs in peaks.items())
        label = "1 process" if ranks == 1 else f"--sequence-parallel {ranks} (per process)"
        ax.plot([c for c, _ in points], [m for _, m in points], marker="o", label=label)
    contexts = sorted({r["context"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [f"{c // 1024}k" for c in contexts])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tokens per pair (prompt 3/4, two replies 1/8 each)")
    ax.set_ylabel("training step: peak RSS increase (GB)")
    ax.set_title(f"Llama D {HIDDEN} x {LAYERS} layers, V {VOCAB}, fp32, CPU, one pair per step", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", default="4k,8k,16k,32k")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--json", default=None, help="append the rows here (and plot every row it holds)")
    p.add_argument("--png", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "sequence_parallel_memory.png"))
    p.add_argument("--plot-only", action="store_true", help="plot the rows of --json, run nothing")
    p.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc thresholds as they are")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child)
    rows = []
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            rows = [json.loads(line) for line in f]
    if not args.plot_only:
        import torch
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
              f"{time.strftime('%F %H:%M UTC', time.gmtime())}, malloc: "
              f"{'glibc default' if args.glibc_default else ' '.join(f'{k}={v}' for k, v in MALLOC.items())}")
        print("| tokens per pair | ranks | rank | RSS before step | step peak (increase) | process peak | step s "
              "| loss |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for context in [parse_k(c) for c in args.contexts.split(",")]:
            for ranks in (1, 2):
                new = run(context, ranks, args.timeout, args.glibc_default)
                for r in new:
                    print(f"| {r['context']} | {r['ranks']} | {r['rank']} | {r['before_gb']:.2f} GB | "
                          f"{r['step_gb']:.2f} GB | {r['peak_gb']:.2f} GB | {r['seconds']:.1f} | {r['loss']:.6f} |",
                          flush=True)
                rows += new
                if args.json:
                    with open(args.json, "a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in new)
            one = [r for r in rows if r["context"] == context and r["ranks"] == 1][-1]
            two = [r for r in rows if r["context"] == context and r["ranks"] == 2][-2:]
            diff = max(abs(a - b) / abs(b) for r in two for a, b in zip(r["logps"], one["logps"]))
            print(f"{context} tokens: step peak per process, 2 ranks / 1 process = "
                  f"{max(r['step_gb'] for r in two) / one['step_gb']:.2f}x; process peak "
                  f"{max(r['peak_gb'] for r in two) / one['peak_gb']:.2f}x; log-probs {one['logps']}, largest "
                  f"relative difference {diff:.1e}", flush=True)
    plot(rows, args.png)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
