"""FastDPOTrainer against TRL's DPOTrainer, and both against float64, as the sequence length grows.

    python bench/trl_agreement.py [--lengths 64,256,1024,2048] [--reference initial,perturbed] [--noise 0.05]
                                  [--hidden 64] [--vocab 2048] [--head-std 0.5] [--attention sdpa|eager]
                                  [--gradient-checkpointing] [--out FILE]

For each total length T (tokens per sequence: a prompt of 3T/4 words, a chosen reply filling the rest with its EOS,
a rejected reply T/16 shorter, so the batch has padding), one preference pair, one optimizer step, fp32 on this CPU:
``fastdpo.integrations.trl.FastDPOTrainer`` and ``trl.DPOTrainer`` from the same initial weights, reference, data and
DPOConfig (sigmoid loss, beta 0.1, max_length None: nothing truncated), each in its own fresh copies of the models.
Read from each trainer's log history at step 1: loss, grad_norm (the norm of all parameter gradients before
clipping, as the Hugging Face Trainer logs it), rewards/margins and logps/chosen.

The float64 ground truth of the same step: the batch from the trainer's own dataloader (TRL's tokenization and
collator, so ids and masks are the ones both trainers saw), the policy and reference in float64, the plain path of
``fastdpo.reference`` (logits -> log_softmax -> gather -> masked sum, then TRL's sigmoid loss term by term), backward,
and the norm of all parameter gradients.

References (``--reference``), passed to both trainers as ``ref_model`` (TRL's ``ref_model=None`` reloads the
policy from its hub name, which a model built from a config does not have): ``initial`` = a copy of the initial
policy (loss ln 2 and margins 0 at step 1: the grad_norm is the informative figure), ``perturbed`` = the initial
weights plus Gaussian noise (each tensor's noise ``--noise`` x its own std, scaled by sqrt(64 / T)), so that loss and
margins are not at their degenerate values. A margin is a difference of log-prob sums of thousands of nats: its
relative error is against its own small value, so it is large where fp32's resolution of those sums is.

The model (defaults): a random Llama (hidden 64, 2 layers, FFN 2 x hidden, 4 heads, vocabulary 2048, untied head
drawn with std 0.5 as tests/test_trl_parity.py does, so that the next-token distributions are peaked), sdpa
attention, built from a config; the tokenizer: a whitespace WordLevel one built here (one word = one token). No
downloads. Each table row is tagged with machine, versions, commit and date.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import math
import os
import random
import sys
import tempfile

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TQDM_DISABLE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from compare import device_name, git_commit, version  # noqa: E402

from fastdpo import reference as R  # noqa: E402
from fastdpo.integrations.trl import FastDPOTrainer  # noqa: E402

D, LAYERS, HEADS, V = 64, 2, 4, 2048     # --hidden, --vocab (the FFN is 2 x hidden)
SPECIAL = ["<pad>", "</s>", "<unk>"]
BETA, SEED = 0.1, 0
HEAD_STD, ATTENTION, CHECKPOINTING = 0.5, "sdpa", False     # --head-std, --attention, --gradient-checkpointing
QUANTITIES = ("grad_norm", "loss", "rewards/margins", "logps/chosen")


# ------------------------------------------------------------------------------------------------ model and data

def make_tokenizer() -> PreTrainedTokenizerFast:
    """One whitespace word = one token: <pad> 0, </s> 1 (EOS), <unk> 2, w0.. from 3."""
    vocab = {s: i for i, s in enumerate(SPECIAL)} | {f"w{i}": i + len(SPECIAL) for i in range(V - len(SPECIAL))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_pair(T: int) -> Dataset:
    """One pair: prompt 3T/4 words, chosen T - 3T/4 - 1 words (+ EOS = T tokens), rejected T/16 words shorter."""
    rng = random.Random(T)
    words = lambda n: " ".join(f"w{rng.randrange(V - len(SPECIAL))}" for _ in range(n))  # noqa: E731
    prompt = 3 * T // 4
    chosen = T - prompt - 1
    return Dataset.from_dict({"prompt": [words(prompt)], "chosen": [" " + words(chosen)],
                              "rejected": [" " + words(chosen - T // 16)]})


def initial_state(T: int) -> dict:
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(llama_config(T))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, HEAD_STD)
    return {k: v.clone() for k, v in model.state_dict().items()}


def llama_config(T: int) -> LlamaConfig:
    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=max(T, 64),
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    config._attn_implementation = ATTENTION
    return config


def perturbed(state: dict, noise: float, T: int) -> dict:
    """Each floating tensor plus N(0, (noise * sqrt(64 / T) * its std)^2); a fixed generator."""
    gen = torch.Generator().manual_seed(SEED + 1)
    scale = noise * math.sqrt(64 / T)
    out = {}
    for k, v in state.items():
        std = v.float().std().item() if v.numel() > 1 else 0.0
        std = std or v.abs().mean().item()                  # RMSNorm weights are all 1: std 0, use their size
        out[k] = v + scale * std * torch.randn(v.shape, generator=gen, dtype=v.dtype)
    return out


def build(T: int, state: dict, dtype=torch.float32) -> LlamaForCausalLM:
    model = LlamaForCausalLM(llama_config(T))
    model.load_state_dict(state)
    return model.to(dtype)


# ------------------------------------------------------------------------------------------------ the three paths

def dpo_config(output_dir: str) -> DPOConfig:
    return DPOConfig(output_dir=output_dir, report_to=[], use_cpu=True, bf16=False, fp16=False,
                     gradient_checkpointing=CHECKPOINTING, per_device_train_batch_size=1, max_steps=1,
                     learning_rate=1e-3, logging_steps=1, save_strategy="no", beta=BETA, loss_type="sigmoid", seed=SEED,
                     max_length=None, disable_tqdm=True)


def make_trainer(cls, T: int, policy: dict, ref: dict, output_dir: str):
    with contextlib.redirect_stdout(io.StringIO()):
        return cls(model=build(T, policy), ref_model=build(T, ref), args=dpo_config(output_dir),
                   train_dataset=make_pair(T), processing_class=make_tokenizer())


def trained_step(cls, T: int, policy: dict, ref: dict) -> dict:
    """Step 1's logged quantities of one trainer."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(cls, T, policy, ref, tmp)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
    (entry,) = [h for h in trainer.state.log_history if "loss" in h]
    return {q: float(entry[q]) for q in QUANTITIES}


def float64_step(T: int, policy: dict, ref: dict) -> tuple:
    """The same step in float64 on the plain path: (quantities, the batch's shape and scored-token counts)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(DPOTrainer, T, policy, ref, tmp)
        batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = dict(attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"))
    model, ref_model = build(T, policy, torch.float64), build(T, ref, torch.float64)
    model.train()                   # as the trainer runs it (no dropout in Llama by default)
    with torch.no_grad():
        ref_c, ref_r = R.model_sequence_logps(ref_model, batch["input_ids"], labels, **inputs).chunk(2)
    pol_c, pol_r = R.model_sequence_logps(model, batch["input_ids"], labels, **inputs).chunk(2)
    loss, metrics = R.dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=BETA, loss_type="sigmoid")
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    got = {"grad_norm": grad_norm.item(), "loss": loss.item(), "rewards/margins": metrics["rewards/margins"].item(),
           "logps/chosen": metrics["logps/chosen"].item()}
    shape = dict(rows=tuple(batch["input_ids"].shape), scored=(labels[:, 1:] != -100).sum(1).tolist(),
                 keys=sorted(batch))
    return got, shape


# ------------------------------------------------------------------------------------------------ the table

def rel(a: float, b: float) -> str:
    """|a - b| / |b| (the absolute difference where b is 0)."""
    if b == 0.0:
        return "0" if a == 0.0 else f"abs {abs(a):.1e}"
    return f"{abs(a - b) / abs(b):.1e}"


def tag() -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return (f"{device_name('cpu')}; torch {version('torch')}, transformers {version('transformers')}, "
            f"trl {version('trl')}; commit {git_commit()}; {date}")


def table_head() -> list:
    cols = ["reference", "T", "quantity", "FastDPOTrainer", "DPOTrainer", "float64", "fast vs TRL",
            "fast vs f64", "TRL vs f64", "tag"]
    return ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 6 + ["---"]) + "|"]


def rows(reference: str, T: int, fast: dict, trl: dict, f64: dict, row_tag: str) -> list:
    out = []
    for q in QUANTITIES:
        a, b, c = fast[q], trl[q], f64[q]
        out.append(f"| {reference} | {T} | {q} | {a:.8g} | {b:.8g} | {c:.8g} | {rel(a, b)} | {rel(a, c)} | "
                   f"{rel(b, c)} | {row_tag} |")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="64,256,1024,2048", help="total tokens per sequence, comma-separated")
    p.add_argument("--reference", default="initial,perturbed", help="initial, perturbed or both (comma-separated)")
    p.add_argument("--noise", type=float, default=0.05, help="perturbed reference: relative noise at T = 64")
    p.add_argument("--head-std", type=float, default=HEAD_STD, help="std of the LM head's initial weights "
                   "(Hugging Face's own init: 0.02, near-uniform next-token distributions)")
    p.add_argument("--hidden", type=int, default=D, help="hidden size")
    p.add_argument("--vocab", type=int, default=V, help="vocabulary size")
    p.add_argument("--attention", default=ATTENTION, choices=("sdpa", "eager"), help="attention implementation")
    p.add_argument("--gradient-checkpointing", action="store_true", help="both trainers with gradient "
                   "checkpointing (TRL's default; off by default here, as in tests/test_integration_trl.py)")
    p.add_argument("--out", default=None, help="also append the table to this file")
    args = p.parse_args(argv)
    try:
        args.lengths = [int(t) for t in args.lengths.split(",")]
    except ValueError:
        p.error(f"--lengths takes comma-separated integers, got {args.lengths!r}")
    args.reference = args.reference.split(",")
    bad = [r for r in args.reference if r not in ("initial", "perturbed")]
    if bad:
        p.error(f"--reference takes initial and/or perturbed, got {','.join(bad)}")
    if any(t < 32 for t in args.lengths):
        p.error(f"--lengths: each length must be >= 32 tokens, got {args.lengths}")
    return args


def main(argv=None) -> None:
    global HEAD_STD, ATTENTION, CHECKPOINTING, D, V
    args = parse_args(argv)
    HEAD_STD, ATTENTION, CHECKPOINTING = args.head_std, args.attention, args.gradient_checkpointing
    D, V = args.hidden, args.vocab
    hf_logging.set_verbosity_error()
    row_tag = tag()
    lines = [f"Model: random Llama, hidden {D}, {LAYERS} layers, FFN {2 * D}, {HEADS} heads, vocabulary {V}, LM head "
             f"std {HEAD_STD}, {ATTENTION} attention, gradient checkpointing {'on' if CHECKPOINTING else 'off'}, "
             f"fp32; sigmoid loss, beta {BETA}, one pair per step; perturbed reference: noise {args.noise} "
             "x sqrt(64 / T). Columns \"a vs b\": |a − b| / |b|.", ""] + table_head()
    print("\n".join(lines), flush=True)
    for reference in args.reference:
        for T in args.lengths:
            policy = initial_state(T)
            ref = policy if reference == "initial" else perturbed(policy, args.noise, T)
            f64, shape = float64_step(T, policy, ref)
            assert shape["rows"] == (2, T), f"batch {shape}: expected 2 rows of {T} tokens (truncated or padded?)"
            print(f"<!-- {reference} T={T}: batch {shape} -->", file=sys.stderr, flush=True)
            fast = trained_step(FastDPOTrainer, T, policy, ref)
            trl = trained_step(DPOTrainer, T, policy, ref)
            new = rows(reference, T, fast, trl, f64, row_tag)
            lines += new
            print("\n".join(new), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
