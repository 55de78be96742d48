"""Long-context layouts of preference pairs: the prompt encoded once per pair, and padding-free packing.

Two layouts, one contract: each builds, from tokenized pairs, the inputs of one backbone pass and, for every scored
token, the flat index of the hidden state that predicts it, in the usual order (the B chosen sequences, then the B
rejected ones). ``fastdpo.model_pair_logps`` / ``model_pair_dpo_loss`` run them; the log-probs equal those of the
plain padded layout ``[prompt + chosen; prompt + rejected]`` (rounding apart).

``pack_pairs`` — one sequence per pair, ``[prompt, chosen, rejected]`` (``share_prompt``; else two sequences,
``[prompt, chosen]`` and ``[prompt, rejected]``), several sequences per row (``packing``), no padding inside a row.
Position ids restart per sequence; the rejected reply's continue from the end of the prompt, as if the chosen reply
were absent. Attention: a token sees the earlier tokens of its own sequence, except that rejected tokens never see
chosen ones; windows (sliding-window layers) count positions. The rejected reply's first token is predicted from
the prompt's last position, whose hidden state serves both replies. The mask goes to the model as a 4D additive
tensor (eager, sdpa) or a FlexAttention block mask.

``prompt_cache_batch`` — the prompts (left-padded) run once with the key/value cache, then both replies run as a
batch of two continuations of it; gradients flow back through the cached keys and values. No custom mask (any
attention implementation with a cache), no packing; it needs the cache, so not with gradient checkpointing.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from typing import Optional

import torch

from ._attention import additive, span_mask

PROMPT, CHOSEN, REJECTED = 0, 1, 2
# Where the prompt cache beats the dense custom mask (CPU, 2 cores, Llama D 256 x 4 layers, sdpa): from a longest
# [prompt, chosen, rejected] of about 2k tokens the cache route, whose prompt pass keeps causal attention, is
# faster (one pair of 2k: 0.9 s vs 1.3 s; 16k + 2 x 1k: 27 s vs 51 s, 2.8 GB vs 3.6 GB peak); below it the
# mask is (2 pairs of ~450 tokens: 0.67x the plain layout's time vs 0.74x). Not measured on a GPU. Span attention
# (fastdpo._attention, no dense mask) matches the cache at 16k + 2 x 1k (22.5 s vs 21.9 s, 2.57 GB vs 2.69 GB
# peak; at 24k + 2 x 4k, in one process: 70-72 s vs 74-76 s) and packs: the trainer takes it wherever it applies.
PROMPT_CACHE_FROM = 2048


@dataclass
class PackedBatch:
    input_ids: torch.Tensor      # [R, L]
    position_ids: torch.Tensor   # [R, L]
    sequence: torch.Tensor       # [R, L] id of the sequence each token belongs to, -1 on padding
    part: torch.Tensor           # [R, L] PROMPT, CHOSEN or REJECTED (without sharing: CHOSEN for both replies)
    index: torch.Tensor          # [2B, T] flat index (row * L + column) of the hidden state predicting each target
    labels: torch.Tensor         # [2B, T] the targets, -100 where not scored

    def to(self, device) -> "PackedBatch":
        return PackedBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def tokens(self) -> int:
        """Positions the backbone computes, padding included."""
        return self.input_ids.numel()


@dataclass
class CacheBatch:
    prompt_ids: torch.Tensor         # [B, P] left-padded
    prompt_mask: torch.Tensor        # [B, P]
    prompt_positions: torch.Tensor   # [B, P]
    reply_ids: torch.Tensor          # [2B, R] right-padded, rows chosen_0, rejected_0, chosen_1, ...
    reply_mask: torch.Tensor         # [2B, R]
    reply_positions: torch.Tensor    # [2B, R] continuing from each prompt's length
    index: torch.Tensor              # [2B, T] flat index into [prompt hidden (B*P); reply hidden (2B*R)]
    labels: torch.Tensor             # [2B, T]

    def to(self, device) -> "CacheBatch":
        return CacheBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def tokens(self) -> int:
        return self.prompt_ids.numel() + self.reply_ids.numel()


def prefers_prompt_cache(pairs) -> bool:
    """Whether the prompt cache is the faster way to share these pairs' prompts (see PROMPT_CACHE_FROM)."""
    return max(len(p) + len(c) + len(r) for p, c, r in pairs) >= PROMPT_CACHE_FROM


def _check_pairs(pairs):
    if not pairs:
        raise ValueError("pairs is empty")
    for i, pair in enumerate(pairs):
        if len(pair) != 3 or not all(isinstance(x, (list, tuple)) for x in pair):
            raise ValueError(f"pairs[{i}] must be (prompt ids, chosen ids, rejected ids), lists of ints")
        if not pair[1] or not pair[2]:
            raise ValueError(f"pairs[{i}] has an empty chosen or rejected reply")


def _targets(rows: list, B: int):
    """[(flat index, label), ...] per scored sequence (2B of them) -> index [2B, T], labels [2B, T]. T is at least 1:
    a batch that scores nothing (one-token sequences: an empty prompt, a reply of only EOS) keeps one unscored column,
    so that its log-probs are 0 and its gradients 0, as TRL's DPOTrainer gives, rather than an empty head input."""
    T = max([1, *(len(r) for r in rows)])
    index = torch.zeros(2 * B, T, dtype=torch.long)
    labels = torch.full((2 * B, T), -100, dtype=torch.long)
    for s, r in enumerate(rows):
        if r:
            index[s, :len(r)] = torch.tensor([i for i, _ in r])
            labels[s, :len(r)] = torch.tensor([y for _, y in r])
    return index, labels


def pack_pairs(pairs, pad_id: int, *, share_prompt: bool = True, packing: bool = True, max_tokens=None) -> PackedBatch:
    """Tokenized ``pairs`` [(prompt, chosen, rejected) id lists] -> PackedBatch.

    ``packing``: sequences fill rows of ``max_tokens`` positions (default: the longest sequence) first-fit in order;
    without it, one sequence per row. A sequence longer than ``max_tokens`` is an error."""
    _check_pairs(pairs)
    seqs = []         # (ids, positions, parts, owner pair, [(offset, target, scored sequence)])
    B = len(pairs)
    for k, (p, c, r) in enumerate(pairs):
        p, c, r = list(p), list(c), list(r)
        np_, nc, nr = len(p), len(c), len(r)
        # the hidden state at offset o predicts token o + 1; a reply's first token comes from the prompt's last
        c_targets = [(np_ + t - 1, c[t], k) for t in range(nc) if np_ + t >= 1]
        if share_prompt:
            r_offsets = [np_ - 1] + [np_ + nc + t - 1 for t in range(1, nr)]
            r_targets = [(o, r[t], B + k) for t, o in enumerate(r_offsets) if o >= 0]
            seqs.append((p + c + r, list(range(np_ + nc)) + list(range(np_, np_ + nr)),
                         [PROMPT] * np_ + [CHOSEN] * nc + [REJECTED] * nr, c_targets + r_targets))
        else:
            r_targets = [(np_ + t - 1, r[t], B + k) for t in range(nr) if np_ + t >= 1]
            seqs.append((p + c, list(range(np_ + nc)), [PROMPT] * np_ + [CHOSEN] * nc, c_targets))
            seqs.append((p + r, list(range(np_ + nr)), [PROMPT] * np_ + [CHOSEN] * nr, r_targets))
    longest = max(len(s[0]) for s in seqs)
    L = longest if max_tokens is None else int(max_tokens)
    if longest > L:
        raise ValueError(f"max_tokens={L} is shorter than a sequence of the batch ({longest} tokens)")
    rows = []         # [(sequence number, start column)] per row, and the used length
    for n, s in enumerate(seqs):
        size = len(s[0])
        for row in (rows if packing else ()):
            if row[1] + size <= L:
                row[0].append((n, row[1]))
                row[1] += size
                break
        else:
            rows.append([[(n, 0)], size])
    R = len(rows)
    L = L if packing else longest
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros(R, L, dtype=torch.long)
    sequence = torch.full((R, L), -1, dtype=torch.long)
    part = torch.full((R, L), -1, dtype=torch.long)
    targets = [[] for _ in range(2 * B)]
    for r, (members, _) in enumerate(rows):
        for n, start in members:
            ids, pos, parts, tg = seqs[n]
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            position_ids[r, start:end] = torch.tensor(pos)
            sequence[r, start:end] = n
            part[r, start:end] = torch.tensor(parts)
            for offset, y, s in tg:
                targets[s].append((r * L + start + offset, y))
    index, labels = _targets(targets, B)
    return PackedBatch(input_ids, position_ids, sequence, part, index, labels)


def prompt_cache_batch(pairs, pad_id: int) -> CacheBatch:
    """Tokenized ``pairs`` -> CacheBatch: prompts left-padded to the longest, replies right-padded."""
    _check_pairs(pairs)
    B = len(pairs)
    P = max(len(p) for p, _, _ in pairs)
    if min(len(p) for p, _, _ in pairs) == 0:
        raise ValueError("prompt_cache_batch needs a non-empty prompt in every pair (use pack_pairs)")
    R = max(max(len(c), len(r)) for _, c, r in pairs)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    prompt_positions = torch.zeros(B, P, dtype=torch.long)
    reply_ids = torch.full((2 * B, R), pad_id, dtype=torch.long)
    reply_mask = torch.zeros(2 * B, R, dtype=torch.long)
    reply_positions = torch.zeros(2 * B, R, dtype=torch.long)
    targets = [[] for _ in range(2 * B)]
    for k, (p, c, r) in enumerate(pairs):
        n = len(p)
        prompt_ids[k, P - n:] = torch.tensor(list(p))
        prompt_mask[k, P - n:] = 1
        prompt_positions[k, P - n:] = torch.arange(n)
        for j, (reply, s) in enumerate(((c, k), (r, B + k))):
            row = 2 * k + j
            reply_ids[row, :len(reply)] = torch.tensor(list(reply))
            reply_mask[row, :len(reply)] = 1
            reply_positions[row] = n + torch.arange(R)
            # token 0 from the prompt's last hidden state, token t from reply position t - 1
            targets[s] = [(k * P + P - 1, reply[0])] + [(B * P + row * R + t - 1, reply[t])
                                                        for t in range(1, len(reply))]
    index, labels = _targets(targets, B)
    return CacheBatch(prompt_ids, prompt_mask, prompt_positions, reply_ids, reply_mask, reply_positions, index,
                      labels)


# ------------------------------------------------------------------------------------------------ attention masks

def allowed(batch: PackedBatch, window=None) -> torch.Tensor:
    """[R, 1, L, L] bool: may query i attend to key j. Padding attends to itself only (no empty rows)."""
    seq, part, pos = batch.sequence, batch.part, batch.position_ids
    L = seq.shape[1]
    idx = torch.arange(L, device=seq.device)
    ok = (seq[:, :, None] == seq[:, None, :]) & (seq[:, None, :] >= 0) & (idx[None, :, None] >= idx[None, None, :])
    ok &= ~((part[:, :, None] == REJECTED) & (part[:, None, :] == CHOSEN))
    if window is not None:
        ok &= (pos[:, :, None] - pos[:, None, :]) < window
    ok |= torch.eye(L, dtype=torch.bool, device=seq.device)[None] & (seq[:, :, None] < 0)
    return ok[:, None]


def reply_allowed(batch: CacheBatch, window=None) -> torch.Tensor:
    """[2B, 1, R, P + R] bool: may reply query t attend to key k, the P cached prompt keys (of its own pair) first,
    then the R reply keys of its own row (causally)."""
    R, dev = batch.reply_ids.shape[1], batch.reply_ids.device
    prompt_ok = batch.prompt_mask.bool().repeat_interleave(2, 0)[:, None, :]                # [2B, 1, P]
    t = torch.arange(R, device=dev)
    reply_ok = (t[:, None] >= t[None, :])[None] & batch.reply_mask.bool()[:, None, :]         # [2B, R, R]
    prompt_ok = prompt_ok.expand(-1, R, -1)
    if window is not None:
        q = batch.reply_positions[:, :, None]
        prompt_ok = prompt_ok & (q - batch.prompt_positions.repeat_interleave(2, 0)[:, None, :] < window)
        reply_ok = reply_ok & (q - batch.reply_positions[:, None, :] < window)
    return torch.cat([prompt_ok, reply_ok], 2)[:, None]


def spans(batch: PackedBatch) -> Optional[tuple]:
    """Per row, ((start, causal, shared, rejected), ...): the blocks ``allowed`` opens, for
    ``_attention.span_attention``; None when a sequence's parts are not [prompt, chosen, rejected] in order."""
    out = []
    for seq_row, part_row in zip(batch.sequence.tolist(), batch.part.tolist()):
        row, col = [], 0
        for n, run in itertools.groupby(zip(seq_row, part_row), key=lambda x: x[0]):
            parts = [p for _, p in run]
            if n >= 0:
                counts = [parts.count(k) for k in (PROMPT, CHOSEN, REJECTED)]
                if parts != sorted(parts) or sum(counts) != len(parts):
                    return None
                np_, nc, nr = counts
                row.append((col, np_ + nc, np_, nr))
            col += len(parts)
        out.append(tuple(row))
    return tuple(out)


def _block_mask(batch: PackedBatch, window):
    from torch.nn.attention.flex_attention import create_block_mask
    seq, part, pos = batch.sequence, batch.part, batch.position_ids

    def mask_mod(b, h, q, kv):
        ok = (seq[b, q] == seq[b, kv]) & (q >= kv) & ~((part[b, q] == REJECTED) & (part[b, kv] == CHOSEN))
        if window is not None:
            ok = ok & (pos[b, q] - pos[b, kv] < window)
        return ok | (q == kv)
    R, L = seq.shape
    return create_block_mask(mask_mod, R, None, L, L, device=seq.device)


def mask_unavailable(impl: str, device_type: str) -> Optional[str]:
    """Why attention ``impl`` cannot take the layout's masks on ``device_type`` (None: it can)."""
    if impl not in ("eager", "sdpa", "flex_attention"):
        return f"its attention ({impl}) takes no custom mask"
    if impl == "flex_attention" and device_type == "cpu":
        # measured: torch 2.13's CPU FlexAttention gave NaN for some real tokens in 2-8 of 16 identical forwards of
        # a tiny Llama's packed batch (tests/test_layout.py); a wrong answer is worse than none
        return "FlexAttention on the CPU returns NaN for some tokens in some runs (torch 2.13); use sdpa or eager"
    return None


def attention_masks(batch, config, dtype: torch.dtype, cached=None, with_spans: bool = False):
    """The mask argument a Hugging Face backbone takes for ``batch``: one 4D mask, or {layer type: mask} for
    models with ``config.layer_types``; additive in ``dtype`` for eager and sdpa, a BlockMask for flex_attention.
    A CacheBatch: the mask of its reply pass (eager and sdpa); ``cached`` {layer type (None without layer_types):
    prompt keys its cache holds} (a sliding-window cache keeps only the last window - 1). ``with_spans`` (a
    PackedBatch, eager/sdpa, for a backbone run inside ``_attention.spans_attention``): placeholders that carry
    the layout's spans instead (``_attention.span_mask``; the dense mask when the layout has none)."""
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if isinstance(batch, CacheBatch) and impl == "flex_attention":
        raise ValueError("the prompt-cache reply mask is built for eager and sdpa attention")
    device = (batch.input_ids if isinstance(batch, PackedBatch) else batch.reply_ids).device
    why = mask_unavailable(impl, device.type)
    if why is not None:
        raise ValueError(f"the packed/shared layout needs attention that takes a custom mask (eager, sdpa or "
                         f"flex_attention on a GPU): {why}")
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)

    def dense(w, layer_type=None):
        # additive, in the attention's dtype, for eager and sdpa alike: sdpa would otherwise convert a bool mask
        # in every layer, and keep each layer's copy for its backward (measured on the CPU at 8k tokens: 1.3 GB
        # peak instead of 2.2 GB, and 15% faster; the prompt cache's reply pass at 24k + 2 x 4k: see models.py)
        if isinstance(batch, PackedBatch):
            ok = allowed(batch, w)
        else:
            P = batch.prompt_ids.shape[1]
            ok = reply_allowed(batch, w)[..., P - cached[layer_type]:]       # the keys outside are outside w
        return additive(ok, dtype)

    def one(w, layer_type=None):
        if impl == "flex_attention":
            return _block_mask(batch, w)
        if row_spans is None:
            return dense(w, layer_type)
        R, L = batch.input_ids.shape
        return span_mask(row_spans, (R, 1, L, L), w, lambda: dense(w), dtype, batch.input_ids.device)
    row_spans = spans(batch) if with_spans and isinstance(batch, PackedBatch) and impl != "flex_attention" else None
    if types is None:
        return one(window)
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"the packed/shared layout needs attention layers only; this model has {sorted(unknown)} "
                         "layers, whose state would carry across sequences")
    return {t: one(window if t == "sliding_attention" else None, t) for t in set(types)}
