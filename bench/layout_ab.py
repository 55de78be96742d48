"""The layouts of a DPO batch in one process, on the same batches, in alternation: fwd+bwd time.

    python bench/layout_ab.py [short|long] [threads]
    python bench/layout_ab.py pair PROMPT REPLY     # one long pair: span attention against the prompt cache

Routes: ``plain`` (two padded rows per pair, ``fastdpo.model_dpo_loss``), ``mask`` (``pack_pairs``: one sequence per
pair, packed, custom attention mask) and ``cache`` (``prompt_cache_batch``: the prompt once through the key/value
cache), each through ``fastdpo.model_pair_dpo_loss``. Model: the Llama of bench/trainer_compare.py (D 256 x 4
layers, V 32000, random init, fp32, sdpa). Data: 12 batches of 2 pairs, prompts of 16-48 (short) or 192-384 (long)
tokens, replies of 32-128 + 1. Every batch runs through every route in turn (the order reversed on the second
pass), so a drift of this shared machine's speed hits the routes alike; printed: each route's median time and the
median (and quartiles) of its per-batch time ratio to the plain layout. No memory figures: one process.
"""
import random, statistics, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import fastdpo
from fastdpo.layout import pack_pairs, prompt_cache_batch

kind = sys.argv[1] if len(sys.argv) > 1 else "short"
threads = int(sys.argv[2]) if len(sys.argv) > 2 and kind != "pair" else 0
if threads:
    torch.set_num_threads(threads)
P = {"short": (16, 48), "long": (192, 384), "pair": None}[kind]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=65536, pad_token_id=0, tie_word_embeddings=False)
cfg._attn_implementation = "sdpa"
model = LlamaForCausalLM(cfg)
rng = random.Random(1)
def pair():
    w = lambda n: [rng.randrange(4, 32000) for _ in range(n)]
    return w(rng.randint(*P)), w(rng.randint(32, 128) + 1), w(rng.randint(32, 128) + 1)
batches = [[pair(), pair()] for _ in range(12)] if P else []

def plain(pairs):
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long); lab = torch.full_like(ids, -100); mask = torch.zeros_like(ids)
    for i, (row, (p, c, r)) in enumerate(zip(rows, pairs + pairs)):
        ids[i, :len(row)] = torch.tensor(row); mask[i, :len(row)] = 1
        lab[i, len(p):len(row)] = torch.tensor(row[len(p):])
    ref = torch.zeros(len(pairs))
    loss, _ = fastdpo.model_dpo_loss(model, ids, lab, ref, ref, attention_mask=mask)
    return loss

def mask(pairs):
    ref = torch.zeros(len(pairs))
    return fastdpo.model_pair_dpo_loss(model, pack_pairs(pairs, 0), ref, ref, attention="dense")[0]

def span(pairs):
    ref = torch.zeros(len(pairs))
    row = sum(len(p) + len(c) + len(r) for p, c, r in pairs)
    return fastdpo.model_pair_dpo_loss(model, pack_pairs(pairs, 0, max_tokens=row), ref, ref, attention="span")[0]

def cache(pairs):
    ref = torch.zeros(len(pairs))
    return fastdpo.model_pair_dpo_loss(model, prompt_cache_batch(pairs, 0), ref, ref)[0]

routes = {"plain": plain, "mask": mask, "span": span, "cache": cache}
if kind == "pair":                       # one pair, each route twice (the order reversed the second time)
    n_prompt, n_reply = int(sys.argv[2]), int(sys.argv[3])
    w = lambda n: [rng.randrange(4, 32000) for _ in range(n)]  # noqa: E731
    one = [(w(n_prompt), w(n_reply), w(n_reply))]
    times = {"span": [], "cache": []}
    for rep in range(2):
        for k in (list(times) if rep == 0 else list(times)[::-1]):
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            routes[k](one).backward()
            times[k].append(time.perf_counter() - t)
    print(f"one pair {n_prompt} + 2 x {n_reply}: " + ", ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)} s"
                                                           for k, v in times.items()))
    sys.exit()
def run(fn, pairs):
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    fn(pairs).backward()
    return time.perf_counter() - t
for fn in routes.values():
    run(fn, batches[0])
times = {k: [] for k in routes}
for rep in range(2):
    for b in batches:
        for k, fn in (list(routes.items()) if rep % 2 == 0 else list(routes.items())[::-1]):
            times[k].append(run(fn, b))
for k in routes:
    ratios = [a / b for a, b in zip(times[k], times["plain"])]
    print(f"{kind} {k}: median {statistics.median(times[k]):.3f} s, per-batch ratio to plain: median "
          f"{statistics.median(ratios):.3f} (quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}–"
          f"{statistics.quantiles(ratios, n=4)[2]:.3f})")
