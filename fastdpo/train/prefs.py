"""Preference data: load (TRL's formats), check every row, tokenize exactly as TRL's DPOTrainer does, and batch as
[chosen rows; rejected rows].

Errors name the file and the line (or row) at fault. TRL's rules (trl 1.16, ``DPOTrainer._prepare_dataset``): an
implicit prompt is the longest common prefix of chosen and rejected, a space just before the point where they part
going to the completions; plain-text completions get the tokenizer's EOS appended (as text) unless they end with
it, conversational ones do not (the chat template ends the turn); the prompt and each prompt + completion are
tokenized whole, and the completion starts where the two token sequences part.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import warnings
from dataclasses import dataclass
from importlib import resources

import torch

from .config import HUB_NAME

BUNDLED = "support_prefs.jsonl"
# file name ending -> how it is read
FILE_TYPES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "json", ".json.gz": "json", ".parquet": "parquet",
              ".csv": "csv"}
TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("eval", "validation", "valid", "val", "test", "dev")


class DataError(ValueError):
    """Bad preference data: the message names the file and the line or row."""


def bundled_path() -> str:
    return str(resources.files("fastdpo.train.data") / BUNDLED)


def _file_type(path: str):
    lower = path.lower()
    for ending, kind in sorted(FILE_TYPES.items(), key=lambda kv: -len(kv[0])):
        if lower.endswith(ending):
            return kind
    return None


# ------------------------------------------------------------------------------------------------ read

def _read_text(path: str) -> str:
    """The file's text (decompressed for .gz). A byte that is not UTF-8 is an error naming its line and column."""
    try:
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:                  # unreadable, or not a gzip file
        raise DataError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if data.startswith(codecs.BOM_UTF8):              # as spreadsheets write CSV
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, line_start = data.count(b"\n", 0, e.start) + 1, data.rfind(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte {data[e.start]:#04x} at column "
                        f"{e.start - line_start + 1}: {e.reason})") from None


def _read_jsonl(path: str, lines):
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((row, f"{path} line {number}"))
    return rows


def _read_json(path: str):
    """A JSON array of objects, an object of equal-length columns, or (as many .json files are) JSON lines."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            return _read_jsonl(path, text.split("\n"))
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        n = {len(v) for v in data.values()}
        if len(n) != 1:
            raise DataError(f"{path}: an object of columns needs equally long lists, got lengths {sorted(n)}")
        data = [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects (or JSON lines), got a JSON {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path} item {i}: expected a JSON object, got {type(row).__name__}")
    return [(row, f"{path} item {i}") for i, row in enumerate(data)]


def _read_csv(path: str):
    """A header line, then one row per record (a quoted field may span lines); an empty field is null, as pandas
    (and so datasets) reads it. Errors name the line where the record starts."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))       # long completions are not an error
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    rows, header, start = [], None, 1
    try:
        for values in reader:
            where, start = f"{path} line {start}", reader.line_num + 1
            if not values:                                              # a blank line
                continue
            if header is None:
                header = values
            elif len(values) != len(header):
                raise DataError(f"{where}: {len(values)} fields, but the header line has {len(header)}")
            else:
                rows.append(({k: v if v != "" else None for k, v in zip(header, values)}, where))
    except csv.Error as e:
        raise DataError(f"{path} line {start}: not valid CSV ({e})") from None
    return rows


def _read_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:        # pyarrow's errors: not a parquet file, a corrupt page
        raise DataError(f"{path}: cannot read it as parquet ({str(e).strip().splitlines()[0]})") from None
    try:
        rows = table.to_pylist()
    except Exception:             # a value that does not decode (string bytes that are not UTF-8): find its row
        for i in range(table.num_rows):
            try:
                table.slice(i, 1).to_pylist()
            except Exception as e:
                raise DataError(f"{path} row {i}: cannot decode it ({str(e).strip().splitlines()[0]})") from None
        raise
    return [(row, f"{path} row {i}") for i, row in enumerate(rows)]


def _read_splits(data, name: str, split: str = "train"):
    """A datasets DatasetDict (hub name, saved directory) -> (rows of ``split``, eval rows or None)."""
    import datasets
    if isinstance(data, datasets.Dataset):
        return [(dict(r), f"{name} row {i}") for i, r in enumerate(data)], None
    if split not in data:
        raise DataError(f"--dataset {name!r} has no {split!r} split (splits: {sorted(data)}); see --dataset-split")
    evals = next((s for s in EVAL_SPLITS if s in data and s != split), None)
    train = [(dict(r), f"{name} {split} row {i}") for i, r in enumerate(data[split])]
    held = None if evals is None else [(dict(r), f"{name} {evals} row {i}") for i, r in enumerate(data[evals])]
    return train, held


def read_rows(dataset, config=None, split="train", flag="--dataset"):
    """(train rows, eval rows or None), each row (dict, where) with ``where`` naming its file and line. ``config``
    and ``split`` select a Hugging Face dataset's subset and split."""
    path = dataset or bundled_path()
    kind = _file_type(path)
    if os.path.isfile(path):
        if kind is None:
            raise DataError(f"{flag} {path!r}: unsupported file type; use {', '.join(FILE_TYPES)}")
        read = {"jsonl": lambda p: _read_jsonl(p, _read_text(p).split("\n")), "json": _read_json, "csv": _read_csv,
                "parquet": _read_parquet}[kind]
        return read(path), None
    import datasets
    if os.path.isdir(path):
        saved = any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
        try:
            data = datasets.load_from_disk(path) if saved else datasets.load_dataset(path, config)
        except Exception as e:
            raise DataError(f"{flag} {path!r}: cannot load the directory ({str(e).strip().splitlines()[0]})") \
                from None
        return _read_splits(data, path, split)
    if kind is not None or os.path.isabs(path) or path.startswith((".", "~")) or not HUB_NAME.match(path):
        raise DataError(f"{flag} {path!r}: no such file")
    try:
        data = datasets.load_dataset(path, config)
    except Exception as e:
        raise DataError(f"{flag} {path!r}: not a local file, and loading it from the Hugging Face hub failed "
                        f"({str(e).strip().splitlines()[0]})") from None
    return _read_splits(data, path, split)


# ------------------------------------------------------------------------------------------------ check

def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) for m in x)


def _check_field(row, key: str, where: str, optional=False):
    value = row.get(key)
    if value is None:
        if optional:
            return
        raise DataError(f"{where}: {key!r} is {'missing' if key not in row else 'null'}; each row needs 'chosen' "
                        "and 'rejected' texts or message lists")
    if isinstance(value, str):
        return
    if not _is_messages(value):
        raise DataError(f"{where}: {key!r} must be a string or a list of messages, got {type(value).__name__}")
    if not value and not optional:
        raise DataError(f"{where}: {key!r} is an empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key!r} message {i} needs 'role' and 'content' strings, got {m!r}")


def _explicit(row, where: str) -> dict:
    """TRL's maybe_extract_prompt: keep a prompt of the completions' kind, else take the shared prefix."""
    for key in ("prompt", "chosen", "rejected"):
        _check_field(row, key, where, optional=key == "prompt")
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists")
    if prompt is not None and isinstance(prompt, str) == isinstance(chosen, str):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n and isinstance(chosen, str) and chosen[n - 1] == " ":
        n -= 1                            # TRL: the space before the point they part goes to the completions
    if prompt is not None and n == 0:     # a prompt of the other format, and no shared start to take one from
        kinds = ("a string", "message lists") if isinstance(prompt, str) else ("a list of messages", "strings")
        raise DataError(f"{where}: 'prompt' is {kinds[0]} but 'chosen' and 'rejected' are {kinds[1]}; give all "
                        "three as strings or all three as message lists")
    if isinstance(chosen, list) and n == 0:
        raise DataError(f"{where}: no prompt: give a 'prompt' column, or start 'chosen' and 'rejected' with the "
                        "same messages")
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _is_empty(completion) -> bool:
    return completion == "" if isinstance(completion, str) else all(m["content"] == "" for m in completion)


def _check_some_completion(pairs, name: str, columns) -> None:
    """Refuse training data in which every example's chosen and rejected completions are empty: there is nothing
    to prefer (only the EOS token that TRL appends to each would be trained)."""
    if all(_is_empty(p["chosen"]) and _is_empty(p["rejected"]) for p in pairs):
        implicit = "" if "prompt" in columns else " once the prompt (the start they share) is taken off"
        raise DataError(f"--dataset {name!r}: no example has a non-empty completion: in all {len(pairs)} training "
                        f"rows 'chosen' and 'rejected' are empty{implicit}")


def _split_of(row, where: str):
    value = row.get("split")
    text = str(value).strip().lower()
    if text in TRAIN_SPLITS:
        return "train"
    if text in EVAL_SPLITS:
        return "eval"
    raise DataError(f"{where}: unknown split {value!r}; use train, or eval/validation/test for held-out rows")


def _rows_with_columns(rows, flag: str, name: str):
    if not rows:
        raise DataError(f"{flag} {name!r} has no rows")
    columns = set().union(*(r.keys() for r, _ in rows))
    if not {"chosen", "rejected"} <= columns:
        raise DataError(f"{flag} {name!r} needs 'chosen' and 'rejected' columns (and 'prompt' unless implicit); "
                        f"found {sorted(columns)}")
    return columns


def load_pairs(dataset, eval_fraction: float, seed: int, *, config=None, split="train", eval_dataset=None):
    """(train, eval) lists of explicit {"prompt", "chosen", "rejected"} (strings or message lists)."""
    train, held = read_rows(dataset, config, split)
    name = dataset or bundled_path()
    columns = _rows_with_columns(train, "--dataset", name)
    if eval_dataset is not None:                     # a 'split' column of --dataset is then not read
        rows, its_eval = read_rows(eval_dataset, config, split, flag="--eval-dataset")
        held = its_eval or rows
        _rows_with_columns(held, "--eval-dataset", eval_dataset)
    explicit = [_explicit(r, w) for r, w in train]            # every row checked before anything is split off
    if held is not None:
        if not held:
            raise DataError(f"--dataset {name!r}: its eval split has no rows")
        train_rows, eval_rows = explicit, [_explicit(r, w) for r, w in held]
    elif "split" in columns:
        tags = [_split_of(r, w) for r, w in train]
        train_rows = [e for e, t in zip(explicit, tags) if t == "train"]
        eval_rows = [e for e, t in zip(explicit, tags) if t == "eval"]
        if not train_rows:
            raise DataError(f"--dataset {name!r}: every row has an eval split value; no rows left to train on")
        if not eval_rows:
            raise DataError(f"--dataset {name!r}: its 'split' column marks no row eval/validation/test")
    else:
        if len(explicit) < 2:
            raise DataError(f"--dataset {name!r} has 1 row; at least 2 are needed (one is held out for eval)")
        order = torch.randperm(len(explicit), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = min(len(explicit) - 1, max(1, round(len(explicit) * eval_fraction)))
        train_rows, eval_rows = [explicit[i] for i in order[n_eval:]], [explicit[i] for i in order[:n_eval]]
    _check_some_completion(train_rows, name, columns)
    return train_rows, eval_rows


# ------------------------------------------------------------------------------------------------ tokenize

@dataclass
class Example:
    prompt: list
    chosen: list
    rejected: list


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _ids(tokenizer, x, **template) -> list:
    if isinstance(x, list):
        return list(tokenizer.apply_chat_template(x, tokenize=True, return_dict=True, **template)["input_ids"])
    return list(tokenizer(text=x)["input_ids"])


def tokenize_pair(row, tokenizer):
    """(prompt ids, chosen ids, rejected ids, whether the prompt's end merged into the completions), as TRL."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("the data is conversational but the tokenizer has no chat template")
        p = _ids(tokenizer, prompt, add_generation_prompt=True)
        pc, pr = _ids(tokenizer, prompt + chosen), _ids(tokenizer, prompt + rejected)
    else:
        eos = tokenizer.eos_token
        if eos is not None:
            chosen = chosen if chosen.endswith(eos) else chosen + eos
            rejected = rejected if rejected.endswith(eos) else rejected + eos
        p = _ids(tokenizer, prompt)
        pc, pr = _ids(tokenizer, prompt + chosen), _ids(tokenizer, prompt + rejected)
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    return p[:n], pc[n:], pr[n:], n < len(p)


def tokenize(pairs, tokenizer, max_length: int, name: str):
    """Tokenized examples, as TRL: prompt + completion cut to max_length (keep the start), examples whose prompt
    alone fills max_length dropped. Every drop and cut is counted in a warning; no example left is an error
    that says why."""
    out, long_prompts, empty, same, cut, merged = [], [], 0, 0, 0, 0
    for row in pairs:
        p, c, r, m = tokenize_pair(row, tokenizer)
        merged += m
        if len(p) >= max_length:
            long_prompts.append(len(p))
            continue
        # a sequence's first token is predicted from nothing: without a prompt token (no BOS) it is never scored
        unscored = 0 if p else 1
        if len(c) <= unscored or len(r) <= unscored:
            empty += 1
            continue
        same += c == r
        room = max_length - len(p)
        cut += len(c) > room or len(r) > room
        out.append(Example(p, c[:room], r[:room]))
    n = len(pairs)
    if long_prompts:
        warnings.warn(f"{name}: dropped {len(long_prompts)} of {n} examples whose prompt alone is at least "
                      f"max_length={max_length} tokens")
    if empty:
        warnings.warn(f"{name}: dropped {empty} of {n} examples with an empty chosen or rejected completion (or, "
                      "with an empty prompt and no BOS token, a one-token one: nothing precedes it to score it)")
    if cut:
        warnings.warn(f"{name}: truncated the completions of {cut} of {n} examples to fit max_length={max_length}")
    if merged:
        warnings.warn(f"{name}: in {merged} of {n} examples the tokenized prompt is not a prefix of prompt + "
                      "completion (tokens merge across the boundary, or the chat template renders the prompt "
                      "differently); as TRL, the completion starts where they part")
    if same:
        warnings.warn(f"{name}: {same} examples have chosen equal to rejected (they contribute no preference)")
    if not out:
        if long_prompts and len(long_prompts) == n:
            raise DataError(f"{name}: no example fits max_length={max_length}: every prompt is at least that long "
                            f"(the shortest has {min(long_prompts)} tokens)")
        raise DataError(f"{name}: no example left ({len(long_prompts)} prompts too long for max_length="
                        f"{max_length}, {empty} with an empty completion)")
    return out


def collate(examples, pad_id: int):
    """-> input_ids [2B, L], attention_mask [2B, L], labels [2B, L] (Hugging Face style, -100 on prompt and pad:
    the model functions shift them)."""
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
    return input_ids, mask, labels
