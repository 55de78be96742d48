"""Sequence parallelism (fastdpo.sequence_parallel, ``fastdpo train --sequence-parallel``): 2 processes (gloo, fp32)
against one.

One launch (``torchrun --nproc-per-node 2`` of this file) does everything that needs the 2 processes, to keep the
file fast: (1) for tiny Llama (sdpa: span attention, and the dense mask), Qwen2 (tied embeddings) and Gemma2 (eager:
attention softcap, sliding window 4, which cuts into the prompts here), with the shared prompt + packing and with
the plain layout (one padded sequence per row), and Llama with LoRA adapters, each over rows of an odd length (so
they are padded to a multiple of 2): the log-probs, the loss and every parameter gradient (summed over the group, as
the trainer reduces them) equal the unsplit run's within MODEL_RTOL; (2) ``fastdpo train --sequence-parallel 2``
runs (data parallel, and FSDP with gradient checkpointing, whose recompute must attend through the split attention
too) give the single-process run's losses and gradient norms, and a run interrupted after its step-2 checkpoint and
resumed gives the uninterrupted run's. A second launch, of 4 processes, trains with 2 data-parallel groups of 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import GRAD_FLOOR, MODEL_RTOL

HERE = Path(__file__).resolve().parent
FAMILIES = ["llama", "qwen2-tied", "gemma2-softcap"]
# (family, layout, attention, loss options)
CASES = [(f, layout, "auto", {}) for f in FAMILIES for layout in ("shared+packed", "plain")] + [
    ("llama", "shared+packed", "dense", {}),
    ("qwen2-tied", "shared+packed", "auto", dict(loss_type="ipo", ld_alpha=0.5)),
    ("llama", "shared+packed", "auto", dict(lora=True)),      # LoRA adapters (peft) on q/v, B not zero
] + [(f, "shared+packed", "auto", {}) for f in ("qwen3", "mistral-sliding-window", "gemma3-softcap", "phi3")]
TRAIN = dict(steps=3, batch_size=4, eval_every=2, save_every=2, warmup_steps=1, progress=False)


def case_id(case) -> str:
    family, layout, attention, options = case
    return "-".join([family, layout, attention] + [f"{k}={v}" for k, v in options.items()])


# ------------------------------------------------------------------------------------------- the worker (per rank)

def _pairs():
    """Rows of odd length in both layouts: 59 columns shared and packed, 17 plain."""
    from families import V
    g = torch.Generator().manual_seed(0)
    sizes = ((7, 5, 3), (3, 6, 9), (12, 2, 5), (1, 3, 3))
    return [tuple(torch.randint(3, V, (n,), generator=g).tolist() for n in size) for size in sizes]


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(case: str, got: dict, want: dict) -> list:
    """[(case, what, error, bound)] of every compared tensor: log-probs, loss, each parameter gradient."""
    rows = []
    for what in ("logps", "loss"):
        err = (got[what] - want[what]).abs().max().item()
        rows.append((case, what, err, MODEL_RTOL * want[what].abs().max().item()))
    gw, gg = want["grads"], got["grads"]
    rows.append((case, "gradient names", float(gw.keys() != gg.keys()), 0.0))
    floor = GRAD_FLOOR * max(g.abs().max().item() for g in gw.values())
    for n in gw.keys() & gg.keys():
        rows.append((case, f"d/d {n}", (gg[n] - gw[n]).abs().max().item(),
                     MODEL_RTOL * max(gw[n].abs().max().item(), floor)))
    return rows


def model_checks(group) -> list:
    import torch.distributed as dist

    import fastdpo
    from families import tiny
    from fastdpo import sequence_parallel
    from fastdpo.layout import pack_pairs
    from fastdpo.train.prefs import Example, collate

    pairs = _pairs()
    ref = torch.linspace(-30.0, -10.0, 2 * len(pairs)).reshape(2, -1)
    rows = []
    for case in CASES:
        family, layout, attention, options = case
        options = dict(options)
        lora = options.pop("lora", False)
        if layout == "plain":
            batch = pack_pairs(pairs, 0, share_prompt=False, packing=False)
            ids, mask, labels = collate([Example(*p) for p in pairs], 0)

            def unsplit(m):
                return fastdpo.model_dpo_loss(m, ids, labels, *ref, attention_mask=mask, return_logps=True, **options)
        else:
            batch = pack_pairs(pairs, 0, max_tokens=sum(len(p) + len(c) + len(r) for p, c, r in pairs))

            def unsplit(m):
                return fastdpo.model_pair_dpo_loss(m, batch, *ref, attention=attention, return_logps=True, **options)
        assert batch.input_ids.shape[1] % 2 == 1, "the rows are meant to need padding"
        results = {}
        for name in ("unsplit", "split"):
            model = tiny(family)
            if lora:
                from peft import LoraConfig, get_peft_model
                torch.manual_seed(1)
                model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
            model.train()
            if name == "unsplit":
                loss, _, logps = unsplit(model)
            else:
                loss, _, logps = sequence_parallel.model_pair_dpo_loss(model, batch, *ref, group=group,
                                                                       attention=attention, return_logps=True,
                                                                       **options)
            loss.backward()
            grads = _grads(model)
            if name == "split":                    # partial on each rank: the trainer sums them over the group
                for g in grads.values():
                    dist.all_reduce(g, group=group.group)
            results[name] = dict(logps=logps.detach(), loss=loss.detach(), grads=grads)
        rows += _compare(case_id(case), results["split"], results["unsplit"])
    return rows


DIE_AT_STEP_3 = 3


def train_runs(out: Path, data: str) -> None:
    from fastdpo.train import trainer
    from fastdpo.train.config import build

    def run(name, **extra):
        options = dict(TRAIN, dataset=data, sequence_parallel=2, output_dir=str(out / name),
                       cache_dir=str(out / "cache-sp"), **extra)
        return trainer.train(build(options, set(options)))
    run("sp")
    run("fsdp+checkpointing", fsdp=True, gradient_checkpointing=True)    # recompute through the split attention
    real, calls = trainer.pair_loss, []

    def pair_loss_or_die(policy, *args, **kwargs):   # every rank: killed at step 3 (the checkpoint is step 2)
        if policy.training:
            calls.append(1)
            if len(calls) == DIE_AT_STEP_3:
                raise RuntimeError("killed")
        return real(policy, *args, **kwargs)
    trainer.pair_loss = pair_loss_or_die
    try:
        run("interrupted")
    except RuntimeError as e:
        assert str(e) == "killed", e
    trainer.pair_loss = real
    run("interrupted", resume="latest")


def worker(out: str, data: str) -> None:
    import torch.distributed as dist

    from fastdpo.sequence_parallel import SequenceGroup
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if dist.get_world_size() == 4:              # 2 data-parallel groups of 2: replicated, and under FSDP2
        from fastdpo.train import trainer
        from fastdpo.train.config import build
        for name, extra in (("grid", {}), ("grid-fsdp", dict(fsdp=True))):
            options = dict(TRAIN, dataset=data, sequence_parallel=2, output_dir=str(Path(out) / name),
                           cache_dir=str(Path(out) / f"cache-{name}"), **extra)
            trainer.train(build(options, set(options)))
        return
    group = SequenceGroup(dist.new_group([0, 1]), 2, dist.get_rank())
    start = time.perf_counter()
    rows = model_checks(group)
    seconds = {"model checks": time.perf_counter() - start}
    start = time.perf_counter()
    train_runs(Path(out), data)
    seconds["training runs"] = time.perf_counter() - start
    if dist.get_rank() == 0:
        (Path(out) / "results.json").write_text(json.dumps(dict(rows=rows, seconds=seconds)))
    dist.barrier()


# --------------------------------------------------------------------------------------------------- the tests

def test_one_process_is_refused_naming_the_option(monkeypatch):
    from fastdpo.train.dist import Dist
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"^--sequence-parallel 2: the number of processes \(1\) must be divisible "
                                         "by it$"):
        Dist(sequence_parallel=2)


def _refused(model, size=2, **cfg):
    from types import SimpleNamespace

    from fastdpo.train.trainer import check_sequence_parallel
    options = {**dict(prompt_cache=None, use_weighting=False, router_aux_loss_coef=0.0, gradient_checkpointing=False,
                      disable_dropout=True), **cfg}
    with pytest.raises(ValueError) as e:
        check_sequence_parallel(SimpleNamespace(**options), model, SimpleNamespace(sp=size))
    return str(e.value)


def test_what_it_cannot_split_exactly_is_refused_in_one_line():
    from families import tiny
    llama = tiny("llama")                   # 4 heads, 2 key/value heads
    assert _refused(tiny("gpt-neox")) == (
        "--sequence-parallel 2: --model GPTNeoXForCausalLM is not among the classes verified under it "
        "(LlamaForCausalLM, Qwen2ForCausalLM, Gemma2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, "
        "Gemma3ForCausalLM, Phi3ForCausalLM)")
    assert _refused(llama, 4) == ("--sequence-parallel 4: --model num_key_value_heads (2) must be divisible by it "
                                  "(each rank attends with a 1/4 of the heads)")
    assert _refused(llama, prompt_cache=True).startswith("--sequence-parallel 2: the prompt-cache route is not split")
    assert _refused(llama, use_weighting=True) == ("--sequence-parallel 2: --use-weighting (WPO) is not supported "
                                                   "under sequence parallelism")
    assert _refused(llama, disable_dropout=False).startswith(
        "--sequence-parallel 2: --no-disable-dropout is not supported under sequence parallelism")
    llama.config._attn_implementation = "flex_attention"
    assert _refused(llama) == ("--sequence-parallel 2: --model it runs eager and sdpa attention (verified), not "
                               "'flex_attention'")
    assert all("\n" not in m for m in (_refused(llama), _refused(llama, 4)))


def _metrics(out: Path) -> list:
    with open(out / "metrics.jsonl") as f:
        # grad_norm: AdamW hides a gradient's scale from the losses, the clipped norm does not
        return [{k: r[k] for k in ("step", "loss", "grad_norm", "eval_loss") if k in r} for r in map(json.loads, f)]


def _launch(tmp: Path, data: str, processes: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
               str(29600 + os.getpid() % 300 + processes), str(Path(__file__)), str(tmp), data]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The single-process run here, then the one launch of 2 processes -> (tmp dir, results)."""
    pytest.importorskip("datasets")
    from test_trainer import small_bundled

    from fastdpo.train import trainer
    from fastdpo.train.config import build
    tmp = tmp_path_factory.mktemp("sp")
    data = small_bundled(tmp)
    options = dict(TRAIN, dataset=data, output_dir=str(tmp / "single"), cache_dir=str(tmp / "cache-single"))
    trainer.train(build(options, set(options)))
    _launch(tmp, data, 2)
    return tmp, json.loads((tmp / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_split_rows_give_the_unsplit_log_probs_loss_and_gradients(launched, case):
    _, results = launched
    rows = [r for r in results["rows"] if r[0] == case_id(case)]
    assert len(rows) > 3, f"{case_id(case)}: not compared"
    bad = [f"{what}: {err:.3e} > {bound:.3e}" for _, what, err, bound in rows if not err <= bound]
    assert not bad, f"{case_id(case)}: " + "; ".join(bad)


def _assert_same_curve(tmp: Path, run: str) -> None:
    want, got = _metrics(tmp / "single"), _metrics(tmp / run)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    assert [r["step"] for r in want if "loss" in r] == [1, 2, 3]
    for g, w in zip(got, want):
        for key in g.keys() - {"step"}:
            assert abs(g[key] - w[key]) <= 1e-5 * abs(w[key]), f"{run} step {w['step']} {key}: {g[key]} vs {w[key]}"


@pytest.mark.slow
@pytest.mark.parametrize("run", ["sp", "fsdp+checkpointing"])
def test_training_run_gives_the_single_process_losses(launched, run):
    _assert_same_curve(launched[0], run)


@pytest.mark.slow
def test_two_data_parallel_groups_of_two_give_the_single_process_losses(launched):
    """4 processes (about 45 s more): the groups' shares of each micro-batch, gradients summed over a group and
    averaged over the groups, by the all-reduce and by FSDP2's divide factor (2 groups: not 1)."""
    tmp, _ = launched
    _launch(tmp, str(tmp / "small.jsonl"), 4)
    _assert_same_curve(tmp, "grid")
    _assert_same_curve(tmp, "grid-fsdp")


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_run(launched):
    tmp, _ = launched
    assert _metrics(tmp / "interrupted") == _metrics(tmp / "sp")


if __name__ == "__main__":
    worker(*sys.argv[1:3])
