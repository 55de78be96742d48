"""Preference data: load (TRL's formats), tokenize, truncate, and batch as [chosen rows; rejected rows]."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from importlib import resources

import torch

BUNDLED = "support_prefs.jsonl"
FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def bundled_path() -> str:
    return str(resources.files("fastdpo.data") / BUNDLED)


def load_pairs(dataset, eval_fraction: float, seed: int):
    """(train, eval) lists of {"prompt", "chosen", "rejected"} strings or message lists, from a file or hub name."""
    import datasets

    path = dataset or bundled_path()
    ext = os.path.splitext(path)[1].lower()
    if ext in FILE_TYPES:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--dataset: no such file {path!r}")
        data = datasets.load_dataset(FILE_TYPES[ext], data_files=path, split="train")
    else:
        data = datasets.load_dataset(path, split="train")
    columns = set(data.column_names)
    if not {"chosen", "rejected"} <= columns:
        raise ValueError(f"--dataset needs 'chosen' and 'rejected' columns (and 'prompt' unless implicit); "
                         f"found {sorted(columns)}")
    rows = [dict(r) for r in data]
    if "split" in columns:
        train = [r for r in rows if r["split"] != "eval"]
        evals = [r for r in rows if r["split"] == "eval"]
    else:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = max(1, int(len(rows) * eval_fraction))
        evals, train = [rows[i] for i in order[:n_eval]], [rows[i] for i in order[n_eval:]]
    return [_explicit(r) for r in train], [_explicit(r) for r in evals]


def _explicit(row):
    """Implicit prompt (no 'prompt' column): the prompt is the longest common prefix of chosen and rejected."""
    if "prompt" in row and row["prompt"] is not None:
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    chosen, rejected = row["chosen"], row["rejected"]    # strings, or message lists (whole messages compared)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _text_ids(tokenizer, prompt, completion):
    """Token ids of prompt and completion (chat template for conversational data), completion ending in EOS."""
    if isinstance(prompt, list):
        p_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full_text.startswith(p_text):
            raise ValueError("the tokenizer's chat template does not render the prompt as a prefix of the full "
                             "conversation; cannot mask the prompt")
        p = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        c = tokenizer(full_text[len(p_text):], add_special_tokens=False)["input_ids"]
    else:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and (not p or p[0] != tokenizer.bos_token_id):
        p = [tokenizer.bos_token_id] + p
    if tokenizer.eos_token_id is not None and (not c or c[-1] != tokenizer.eos_token_id):
        c = c + [tokenizer.eos_token_id]
    return p, c


@dataclass
class Example:
    prompt: list
    chosen: list
    rejected: list


def tokenize(pairs, tokenizer, max_length: int, name: str):
    """Tokenized examples; over-long completions truncated, prompts longer than max_length dropped (counted)."""
    out, dropped, same = [], 0, 0
    for row in pairs:
        p, c = _text_ids(tokenizer, row["prompt"], row["chosen"])
        _, r = _text_ids(tokenizer, row["prompt"], row["rejected"])
        if len(p) >= max_length:
            dropped += 1
            continue
        same += c == r
        room = max_length - len(p)
        out.append(Example(p, c[:room], r[:room]))
    if dropped:
        warnings.warn(f"{name}: dropped {dropped} of {len(pairs)} examples whose prompt alone exceeds "
                      f"max_length={max_length}")
    if same:
        warnings.warn(f"{name}: {same} examples have chosen equal to rejected (they contribute no preference)")
    if not out:
        raise ValueError(f"{name}: no example fits max_length={max_length} (every prompt is longer)")
    return out


def collate(examples, pad_id: int):
    """-> input_ids [2B, L], attention_mask [2B, L], labels [2B, L-1] (next-token targets; -100 on prompt/pad)."""
    seqs = [e.prompt + e.chosen for e in examples] + [e.prompt + e.rejected for e in examples]
    prompt_lens = [len(e.prompt) for e in examples] * 2
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        input_ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, p:len(s)] = torch.tensor(s[p:])
    return input_ids, mask, labels[:, 1:]
