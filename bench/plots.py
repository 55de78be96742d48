"""The README's two plots, drawn from the tables in bench/RESULTS.md (no figure is typed into this script).

    python bench/plots.py [--results bench/RESULTS.md] [--out-dir bench]

- ``memory_vs_context.png``: peak memory against context. Left, whole trainers (`fastdpo train`, its plain
  layout, TRL's DPOTrainer), from the newest "Peak RSS ... against context per pair" table of
  ``bench/trainer_compare.py --memory-vs-context``; right, the log-prob op alone (fastdpo, TRL's chunked op, naive
  PyTorch), from the CPU `sequence_logps` tables of ``bench/compare.py --shape S1/S2/long``.
- ``speed_ratios.png``: fwd+bwd time of fastdpo's `sequence_logps` over each peer's, per shape, from the H200
  tables (``bash bench/gpu_check.sh``) and the CPU tables (``bench/compare.py``).

Each caption names the device and date that the source table's header line gives. Which table feeds which plot
is chosen below by its section title; re-measuring means replacing that table in RESULTS.md (or pointing a
constant here at the new section) and running this script again.
"""
from __future__ import annotations

import argparse
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))

# The sources: (section title prefix, a line inside it that precedes the table).
TRAINER_MEMORY = ("CPU, fp32, 2 cores: whole trainers with span attention",
                  "### Peak RSS (and the last optimizer step's time) against context per pair")
OP_CPU = "CPU, fp32, 2 cores (x86-64 AMD EPYC, AVX2): `sequence_logps`"
OP_GPU = "GPU: NVIDIA H200"
OP_CPU_SHAPES = ["S1", "S2", "long"]          # `### S1` ... subsections, each opening with `**S1**: ... (N 2048, ...`
OP_GPU_SHAPES = ["llama3", "gemma2"]          # `**llama3**: ...` lines in the GPU section
FASTDPO = "fastdpo `sequence_logps`"
PEERS = {"TRL `ChunkedLogProbFunction`": "TRL chunked", "Liger `LigerFusedLinearDPOLoss`": "Liger fused DPO¹",
         "CCE `linear_cross_entropy`": "CCE", "naive PyTorch (`fastdpo.reference`)": "naive PyTorch"}
MEMORY_PEERS = ["TRL `ChunkedLogProbFunction`", "naive PyTorch (`fastdpo.reference`)"]
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def sections(text: str) -> dict[str, list[str]]:
    """Level-2 sections of a markdown file: title -> its lines."""
    out, title = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            out[title] = []
        elif title is not None:
            out[title].append(line)
    return out


def section(text: str, prefix: str) -> list[str]:
    found = [body for title, body in sections(text).items() if title.startswith(prefix)]
    if len(found) != 1:
        raise ValueError(f"RESULTS.md: {len(found)} sections start with {prefix!r}, expected 1")
    return found[0]


def table_after(lines: list[str], marker: str, nth: int = -1) -> tuple[list[dict], str]:
    """The markdown table after a line starting with ``marker`` (the last such line unless ``nth``), as rows of
    {column: cell}, and the header line between them that names the device (``device: ...`` or ``... ; date``)."""
    starts = [i for i, line in enumerate(lines) if line.startswith(marker)]
    if not starts:
        raise ValueError(f"RESULTS.md: no line starts with {marker!r}")
    i = starts[nth]
    tag = ""
    while not lines[i].startswith("|"):
        if DATE.search(lines[i]) and not lines[i].startswith(marker):
            tag = lines[i]
        i += 1
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
        i += 1
    header, body = rows[0], rows[2:]
    note = next((line for line in lines[i:i + 3] if line.startswith("Model")), "")
    return [dict(zip(header, r)) for r in body], tag + ("\n" + note if note else "")


def device_and_date(tag: str) -> str:
    """'AMD EPYC, 2 cores, torch 2 threads, fp32 | ... | 2026-12-02 03:58 UTC | ...' -> 'AMD EPYC, 2 cores, ...,
    2026-12-02'; the compare.py form 'NVIDIA H200; torch ...; 2026-11-27 16:33 UTC' likewise."""
    device = re.split(r"[|;]", tag.removeprefix("device:"))[0].strip()
    return f"{device}, {DATE.search(tag).group(0)}"


def model_of(tag: str) -> str:
    """The model that the line under a trainer table names: 'Model 19.5 M parameters (Llama, D 256 × 4 layers,
    V 32000), fp32; ...' -> 'Llama, D 256 × 4 layers, V 32000'."""
    m = re.search(r"\nModel [^(]*\(([^)]*)\)", tag)
    return m.group(1) if m else "model: see the table"


def number(cell: str) -> float | None:
    """'2,934.0' -> 2934.0; '0.74 GB, 0.8 s' -> 0.74; 'n/a (...)' or '' -> None."""
    m = re.match(r"[\d,]+(\.\d+)?", cell)
    return float(m.group(0).replace(",", "")) if m else None


def trainer_memory(text: str):
    """{method label: [(tokens per pair, peak RSS GB)]}, caption tag."""
    rows, tag = table_after(section(text, TRAINER_MEMORY[0]), TRAINER_MEMORY[1])
    first = next(iter(rows[0]))
    series = {}
    for r in rows:
        tokens = int(r[first].split()[0])
        for method, cell in list(r.items())[2:]:
            if number(cell) is not None:
                series.setdefault(method, []).append((tokens, number(cell)))
    return series, tag


def op_tables(lines: list[str], shapes: list[str], bold: bool):
    """{shape: (tokens N, {method: row}, tag)} for the compare.py tables of one section."""
    out = {}
    for shape in shapes:
        marker = f"**{shape}**:" if bold else f"### {shape}"
        rows, tag = table_after(lines, marker, nth=0)
        head = next(line for line in lines[[i for i, l in enumerate(lines) if l.startswith(marker)][0]:]
                    if line.startswith(f"**{shape}**:"))
        tokens = int(re.search(r"\(N (\d+)", head).group(1))
        size = "D {} · V {}".format(*re.search(r"D (\d+), V (\d+)", head).groups())
        out[shape] = (tokens, {r["method"]: r for r in rows}, tag, f"{shape}: N {tokens}\n{size}")
    return out


def op_memory(text: str):
    """{method: [(tokens, peak growth MB)]} on the CPU, caption tag, head size ('D 1024 · V 32000')."""
    series = {}
    tables = op_tables(section(text, OP_CPU), OP_CPU_SHAPES, bold=False)
    for tokens, rows, _, _ in tables.values():
        for method in [FASTDPO, *MEMORY_PEERS]:
            if method in rows and number(rows[method]["peak growth MB"]) is not None:
                series.setdefault(method, []).append((tokens, number(rows[method]["peak growth MB"])))
    first = tables[OP_CPU_SHAPES[0]]
    return series, first[2], first[3].split("\n")[1]


def speed_ratios(text: str):
    """[(panel title, {shape: {peer label: fastdpo time / peer time}})] for the GPU and the CPU."""
    panels = []
    for prefix, shapes, bold, what in [(OP_GPU, OP_GPU_SHAPES, True, "bf16"),
                                       (OP_CPU, OP_CPU_SHAPES, False, "fp32")]:
        ratios, tag = {}, ""
        for shape, (tokens, rows, tag, label) in op_tables(section(text, prefix), shapes, bold).items():
            mine = number(rows[FASTDPO]["fwd+bwd ms"])
            peers = {PEERS[m]: mine / number(r["fwd+bwd ms"]) for m, r in rows.items()
                     if m in PEERS and number(r["fwd+bwd ms"])}
            if peers:
                ratios[label] = peers
        panels.append((f"{device_and_date(tag)}, {what}", ratios))
    return panels


def plot_memory(text: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trainers, t_tag = trainer_memory(text)
    ops, o_tag, o_size = op_memory(text)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.3))
    styles = [dict(marker="o", lw=2.5, ms=8, mfc="none"), dict(marker="^", ls="--"), dict(marker="D", ls=":")]
    for (label, pts), style in zip(trainers.items(), styles):
        left.plot(*zip(*sorted(pts)), label=label, **style)
    left.set_title("whole trainer, one pair per step: process peak RSS", fontsize=10)
    left.set_xlabel("tokens per pair (prompt 3/4, two replies 1/8 each)")
    left.set_ylabel("GB")
    for (label, pts), style in zip(ops.items(), styles):
        right.plot(*zip(*sorted(pts)), label={FASTDPO: "fastdpo", **PEERS}[label].rstrip("¹"), **style)
    right.set_title(f"the log-prob op alone (fwd+bwd, {o_size}): peak growth", fontsize=10)
    right.set_xlabel("tokens per step (scored: 3/4)")
    right.set_ylabel("MB")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ticks = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
        ax.set_xticks(ticks, [f"{t // 1024}k" if t >= 1024 else str(t) for t in ticks])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
    fig.text(0.01, 0.01, f"Left: {device_and_date(t_tag)}; {model_of(t_tag)} "
                         "(python bench/trainer_compare.py --memory-vs-context).\n"
                         f"Right: {device_and_date(o_tag)} (python bench/compare.py --shape S1, S2, long; "
                         "a missing point was not run).  Tables: bench/RESULTS.md", fontsize=7.5, color="0.3")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_speed(text: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = speed_ratios(text)
    peers = list(dict.fromkeys(PEERS.values()))
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4.3), sharey=True)
    width = 0.8 / len(peers)
    for ax, (title, ratios) in zip(axes, panels):
        shapes = list(ratios)
        for j, peer in enumerate(peers):
            xs = [i + (j - (len(peers) - 1) / 2) * width for i in range(len(shapes))]
            ys = [ratios[s].get(peer, 0.0) for s in shapes]
            ax.bar(xs, ys, width, label=peer)
            for x, y in zip(xs, ys):
                ax.text(x, y, f"{y:.2f}" if y else "n/a", ha="center", va="bottom", fontsize=7.5)
        ax.axhline(1.0, color="0.3", lw=1)
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("fastdpo time / peer time  (< 1: fastdpo faster)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=len(peers), fontsize=9)
    fig.text(0.01, 0.01, "fwd+bwd of a DPO sigmoid loss through sequence_logps (N tokens, ¼ of them not scored); "
                         "full tables in bench/RESULTS.md (GPU: bash bench/gpu_check.sh; CPU: python bench/compare.py "
                         "--shape S1, --shape S2).\n¹ reference-free: its API takes no reference log-probs.  "
                         "CCE on the CPU: its torch_compile path (logits kept, one product fewer).",
             fontsize=7.5, color="0.3")
    fig.tight_layout(rect=(0, 0.07, 1, 0.92))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    p.add_argument("--out-dir", default=HERE)
    args = p.parse_args(argv)
    with open(args.results, encoding="utf-8") as f:
        text = f.read()
    written = []
    for name, draw in [("memory_vs_context.png", plot_memory), ("speed_ratios.png", plot_speed)]:
        path = os.path.join(args.out_dir, name)
        draw(text, path)
        written.append(path)
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
