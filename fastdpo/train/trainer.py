"""A thin DPO trainer: load -> cache reference log-probs -> loop (forward, fused loss, step, log) -> save.

The reference is the initial policy: its log-probs are computed once, cached on disk and reused, so training holds
one model. They are computed by the training pass's own function (``fastdpo.model_dpo_loss``) on the training
pass's own micro-batches (the first epoch's), so with policy == reference the first step's margins are exactly 0.
The loss runs inside one forward (``ref_cache.Policy``) that FSDP can shard. Weights and optimizer state are float32;
``--torch-dtype`` sets the compute dtype (autocast).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import signal
import threading
import time
import warnings

import numpy as np
import torch

from .. import __version__, sequence_parallel
from ..heads import router_aux_loss_coef, supports_layout
from ..layout import mask_unavailable, pack_pairs, prefers_prompt_cache, prompt_cache_batch
from ..models import check_output_head, model_dpo_loss, model_pair_dpo_loss, output_head, span_unavailable
from . import prefs, ref_cache, runs
from .cache_cmd import DEFAULT_DIR
from .config import TrainConfig
from .config import flag as flag_of
from .dist import Dist
from .reporting import Reporter, plot


class Interrupted(Exception):
    """SIGINT/SIGTERM: the message says where the run stopped and what was saved."""


# ------------------------------------------------------------------------------------------------ load

def load_model(cfg: TrainConfig, train_pairs):
    """(tokenizer, model in float32): --model from the hub or a directory, else a small seeded Llama + a tokenizer
    trained on the data."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if cfg.model is None:
        from .tokenizer import check_resumable, trained_tokenizer
        tokenizer = trained_tokenizer(train_pairs, vocab_size=1024, cache_dir=cache_dir(cfg))
        if cfg.resume:
            check_resumable(tokenizer, runs.resume_path(cfg))
        torch.manual_seed(cfg.seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
        if cfg.attn_implementation:
            config._attn_implementation = cfg.attn_implementation
        return tokenizer, AutoModelForCausalLM.from_config(config)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, "--tokenizer" if cfg.tokenizer else "--model", cfg)
    return tokenizer, load_pretrained(cfg.model, "--model", cfg)


def _check_local(name: str, flag: str) -> None:
    if os.path.exists(name) and not os.path.isdir(name):
        raise ValueError(f"{flag} {name!r} is a file; give the model's directory or a hub name")
    if os.path.isabs(name) and not os.path.isdir(name):
        raise ValueError(f"{flag} {name!r}: no such directory")


def load_pretrained(name: str, flag: str, cfg: TrainConfig):
    """A causal LM from the hub or a directory, in float32 (the master weights)."""
    from transformers import AutoModelForCausalLM
    _check_local(name, flag)
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
                                                    attn_implementation=cfg.attn_implementation)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {name!r}: cannot load it ({str(e).strip().splitlines()[0]})") from None


def load_tokenizer(name: str, flag: str, cfg: TrainConfig):
    from transformers import AutoTokenizer
    _check_local(name, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {name!r}: cannot load it ({str(e).strip().splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{flag} {name!r}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model) -> None:
    """Dropout off everywhere, as TRL's ``disable_dropout``: nn.Dropout modules and the float dropout rates that
    attention modules pass to their kernels."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def with_lora(model, cfg: TrainConfig):
    """Wrap in LoRA adapters (peft) when --lora-r > 0. Their B starts at zero, so the initial policy (the
    reference) is the base model."""
    if cfg.lora_r <= 0:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("--lora-r needs the peft package (pip install peft)") from None
    targets = cfg.lora_target_modules
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise ValueError(f"--lora-target-modules {targets!r}: {str(e).strip().splitlines()[0]}") from None


def cache_dir(cfg: TrainConfig) -> str:
    return cfg.cache_dir or DEFAULT_DIR


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.torch_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.torch_dtype)


# ------------------------------------------------------------------------------------------------ forward passes

def layout_inputs(examples, idx, pad_id, cfg: TrainConfig, device, split: bool = False):
    """examples[idx] in the run's layout -> (model-level function, its batch arguments, positions computed).
    ``split`` (sequence parallelism): always a PackedBatch, whose columns the ranks split (the plain layout as one
    padded sequence per row)."""
    batch = [examples[i] for i in idx]
    if not (cfg.share_prompt or cfg.packing or split):
        input_ids, mask, labels = (t.to(device) for t in prefs.collate(batch, pad_id))
        return "plain", (input_ids, labels), dict(attention_mask=mask), input_ids.numel()
    pairs = [(e.prompt, e.chosen, e.rejected) for e in batch]
    cache = False if split else cfg.prompt_cache
    if cache is None:   # auto: where it was measured faster (not against span attention), never with checkpointing
        cache = (cfg.share_prompt and not cfg.gradient_checkpointing and not cfg.span_attention
                 and prefers_prompt_cache(pairs))
    if cache:
        packed = prompt_cache_batch(pairs, pad_id)
    else:
        # span attention: one row for the whole micro-batch (no padding; the attention never crosses sequences)
        row = (sum(len(p) * (1 if cfg.share_prompt else 2) + len(c) + len(r) for p, c, r in pairs)
               if cfg.span_attention and cfg.packing else None)
        packed = pack_pairs(pairs, pad_id, share_prompt=cfg.share_prompt, packing=cfg.packing, max_tokens=row)
    return "pairs", (packed.to(device),), dict(attention="span" if cfg.span_attention else "dense"), packed.tokens


def pair_loss(policy, examples, idx, ref, pad_id, cfg: TrainConfig, device, return_logps=False):
    """(loss, metrics, positions computed) of examples[idx], and the policy's log-probs [2b] before the count with
    ``return_logps``: ``model_dpo_loss`` (or ``model_pair_dpo_loss`` in the shared/packed layout)."""
    group = policy.sequence              # sequence parallelism: this rank's columns of the rows, the group's sums
    kind, args, kwargs, tokens = layout_inputs(examples, idx, pad_id, cfg, device, split=group is not None)
    ref_c = ref_r = None                              # --reference-free
    if ref is not None:
        ref_pairs = ref[idx].to(device=device, dtype=torch.float32)
        ref_c, ref_r = ref_pairs[:, 0], ref_pairs[:, 1]
    fn = model_dpo_loss if kind == "plain" else model_pair_dpo_loss
    if group is not None:
        fn = functools.partial(sequence_parallel.model_pair_dpo_loss, group=group)
        rows, columns = args[0].input_ids.shape
        tokens = rows * -(-columns // group.size)          # this rank's columns (the rows padded to a multiple)
    if cfg.router_aux_loss_coef and not return_logps:      # training and evaluation, not the log-prob passes
        kwargs = dict(kwargs, router_aux_loss_coef=cfg.router_aux_loss_coef)
    out = policy(fn, *args, ref_c, ref_r, **kwargs, **cfg.loss_options(), return_logps=return_logps)
    return (*out, tokens)


def resolve_layout(cfg: TrainConfig, model, device: torch.device) -> None:
    """--share-prompt / --packing: auto -> on where the model supports the layout. --prompt-cache stays auto
    (None) unless given: then each micro-batch whose pairs are long shares its prompts through the cache.
    --span-attention: auto -> on the CPU where ``fastdpo.models.span_unavailable`` finds nothing missing."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    supported = supports_layout(base)
    impl = getattr(base.config, "_attn_implementation", None) or "eager"
    reason = None if supported else f"{type(base).__name__} is not among the classes verified for it"
    if reason is None and cfg.router_aux_loss_coef:
        reason = "the MoE load-balancing loss (--router-aux-loss-coef) is TRL's over the padded pairs"
    if reason is None:
        reason = mask_unavailable(impl, device.type)
    for name in ("share_prompt", "packing"):
        if getattr(cfg, name) is None:
            setattr(cfg, name, reason is None)
        elif getattr(cfg, name) and reason is not None:
            raise ValueError(f"{flag_of(name)}: {reason}; use --no-{name.replace('_', '-')}")
    if cfg.prompt_cache and not cfg.share_prompt:
        raise ValueError("--prompt-cache shares the prompt: it needs --share-prompt")
    if cfg.prompt_cache and (cfg.packing or cfg.gradient_checkpointing):
        raise ValueError("--prompt-cache needs --no-packing and no --gradient-checkpointing (the key/value cache "
                         "is off under checkpointing)")
    layout = cfg.share_prompt or cfg.packing
    # checkpointing is switched on after the reference pass: the flag counts, for both passes alike
    missing = span_unavailable(base, cfg.gradient_checkpointing)
    if cfg.span_attention is None:
        cfg.span_attention = bool(layout and device.type == "cpu" and missing is None)
    elif cfg.span_attention:
        why = "it applies to --share-prompt/--packing" if not layout else missing
        if why:
            raise ValueError(f"--span-attention: {why}; use --no-span-attention")


def check_sequence_parallel(cfg: TrainConfig, model, dist: Dist, what: str = "--model") -> None:
    """--sequence-parallel N > 1: what it cannot split exactly, refused up front in one line."""
    if dist.sp == 1:
        return
    flag = f"--sequence-parallel {dist.sp}"
    why = sequence_parallel.sequence_parallel_unavailable(model, dist.sp)
    if why:
        raise ValueError(f"{flag}: {what} {why}")
    if cfg.prompt_cache:
        raise ValueError(f"{flag}: the prompt-cache route is not split over ranks; drop --prompt-cache (the shared "
                         "prompt then goes through the packed layout's mask)")
    if cfg.use_weighting:
        raise ValueError(f"{flag}: --use-weighting (WPO) is not supported under sequence parallelism")
    if cfg.router_aux_loss_coef:
        raise ValueError(f"{flag}: --router-aux-loss-coef (MoE) is not supported under sequence parallelism")
    if not cfg.disable_dropout:
        raise ValueError(f"{flag}: --no-disable-dropout is not supported under sequence parallelism (the ranks of a "
                         "group would draw the same dropout masks for their shares of the heads and tokens, not the "
                         "unsplit run's); drop --no-disable-dropout")


@torch.no_grad()
def train_reference(policy, examples, pad_id, cfg: TrainConfig, dist: Dist, amp, progress) -> torch.Tensor:
    """[n, 2] reference log-probs of the training split, computed as the training pass computes them: the same
    function on the same micro-batches (the first epoch's, each rank its shard)."""
    from tqdm.auto import tqdm

    stream = MicroBatches(examples, cfg)
    zeros = torch.zeros(len(examples), 2, dtype=torch.float64)
    index, rows = [], []
    policy.eval()
    for k in tqdm(range(stream.first_epoch), desc="reference log-probs", disable=not progress):
        idx = dist.shard(stream(k))
        with amp():
            _, _, logps, _ = pair_loss(policy, examples, idx, zeros, pad_id, cfg, dist.device, return_logps=True)
        index += idx
        rows.append(torch.stack(logps.double().chunk(2), 1).cpu())
    return dist.gather_rows(index, torch.cat(rows), len(examples))


def eval_batches(examples, cfg: TrainConfig):
    """The eval split in order, ``--batch-size`` pairs at a time (every rank all of them)."""
    return [list(range(s, min(s + cfg.batch_size, len(examples)))) for s in range(0, len(examples), cfg.batch_size)]


@torch.no_grad()
def eval_logps(policy, examples, pad_id, cfg: TrainConfig, device, amp) -> torch.Tensor:
    """[n, 2] (chosen, rejected) log-probs of the policy on the eval split, in order, as ``evaluate`` computes them
    (the training pass's function on the eval micro-batches; LD-weighted under --ld-alpha)."""
    was_training = policy.training
    policy.eval()
    zeros = torch.zeros(len(examples), 2, dtype=torch.float64)
    out = []
    for idx in eval_batches(examples, cfg):
        with amp():
            _, _, logps, _ = pair_loss(policy, examples, idx, zeros, pad_id, cfg, device, return_logps=True)
        out.append(torch.stack(logps.double().chunk(2), 1).cpu())
    policy.train(was_training)
    return torch.cat(out)


class PerStepReference:
    """The reference recomputed at every step by a frozen copy of the initial policy, indexed like the cached
    [n, 2] tensor: what the cache replaces (the tests and bench/trainer_memory.py compare against it)."""

    def __init__(self, policy, examples, pad_id, cfg: TrainConfig, device, amp):
        import copy
        self.policy, self.examples, self.pad_id = copy.deepcopy(policy).eval(), examples, pad_id
        self.cfg, self.device, self.amp, self.calls = cfg, device, amp, 0

    def __getitem__(self, idx):
        self.calls += 1
        zeros = torch.zeros(len(self.examples), 2, dtype=torch.float64)
        with torch.no_grad(), self.amp():
            _, _, logps, _ = pair_loss(self.policy, self.examples, idx, zeros, self.pad_id, self.cfg, self.device,
                                       return_logps=True)
        return torch.stack(logps.double().chunk(2), 1)


@torch.no_grad()
def evaluate(policy, examples, ref, pad_id, cfg: TrainConfig, device, amp) -> dict:
    """The run's loss and TRL's reward metrics over the eval split, named as TRL logs them (eval_loss,
    eval_rewards/..., eval_logps/...): the training pass's loss on each eval micro-batch, averaged over the pairs
    (exactly the whole split's value for the per-pair losses; aot and sft, which couple a batch's pairs, as TRL
    evaluates them: per batch). The reference's own pass, so at step 0 every margin is exactly 0."""
    was_training = policy.training
    policy.eval()
    totals = {}
    for idx in eval_batches(examples, cfg):
        with amp():
            loss, metrics, _ = pair_loss(policy, examples, idx, ref, pad_id, cfg, device)
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + v.double() * len(idx) / len(examples)
    policy.train(was_training)
    return {f"eval_{k}": v.item() for k, v in totals.items()}


def reference_logps(split: str, policy, examples, pad_id, digest, settings, cfg: TrainConfig, dist: Dist, amp):
    """[n, 2] reference log-probs of a split ("train" or "eval") from the cache, or computed once (as the pass that
    will compare against them computes the policy's) and cached."""
    key = ref_cache.fingerprint(digest, examples, {**settings, "split": split})
    # rank 0 reads the cache for everyone: ranks that disagreed (a node-local cache dir, a file another job is
    # writing) would run different numbers of collective forwards and hang
    cached = dist.from_main(ref_cache.load(cache_dir(cfg), key, len(examples)) if dist.main else None)
    if cached is not None:
        return cached
    if split == "train":
        logps = train_reference(policy, examples, pad_id, cfg, dist, amp, cfg.progress and dist.main)
    else:
        logps = eval_logps(policy, examples, pad_id, cfg, dist.device, amp)
    if dist.main:
        ref_cache.save(cache_dir(cfg), key, logps, about=dict(
            model=cfg.ref_model or cfg.model or "(demo model)", dataset=cfg.eval_dataset if split == "eval" and
            cfg.eval_dataset else cfg.dataset or "(demo data)", split=split, pairs=len(examples),
            written=time.strftime("%F %T"), run=cfg.output_dir))
    dist.barrier()
    return logps


# ------------------------------------------------------------------------------------------------ loop pieces

def batch_indices(k: int, n: int, batch_size: int, seed: int) -> list:
    """Micro-batch k of an endless stream of seeded per-epoch permutations: a pure function of k (exact resume)."""
    out = []
    pos = k * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        take = perm[offset:offset + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


class MicroBatches:
    """Micro-batch k of the training stream, a pure function of k (exact resume): ``batch_size`` pairs of the
    seeded per-epoch permutations, or with --max-tokens as many consecutive pairs of an epoch's permutation as fit
    the token budget (counted without padding, in the run's layout)."""

    def __init__(self, examples, cfg: TrainConfig):
        self.n, self.cfg = len(examples), cfg
        self.sizes = None
        if cfg.max_tokens:
            self.sizes = [len(e.prompt) * (1 if cfg.share_prompt else 2) + len(e.chosen) + len(e.rejected)
                          for e in examples]
            if max(self.sizes) > cfg.max_tokens:
                raise ValueError(f"--max-tokens {cfg.max_tokens}: a training pair has {max(self.sizes)} tokens "
                                 "in this layout; raise it (or lower --max-length)")
        self._epochs = []

    def _epoch(self, e: int) -> list:
        while len(self._epochs) <= e:
            seed = self.cfg.seed * 100003 + len(self._epochs)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()
            batches, used = [[]], 0
            for i in perm:
                if batches[-1] and used + self.sizes[i] > self.cfg.max_tokens:
                    batches.append([])
                    used = 0
                batches[-1].append(i)
                used += self.sizes[i]
            self._epochs.append(batches)
        return self._epochs[e]

    def __call__(self, k: int) -> list:
        if self.sizes is None:
            return batch_indices(k, self.n, self.cfg.batch_size, self.cfg.seed)
        e = 0
        while k >= len(self._epoch(e)):
            k -= len(self._epoch(e))
            e += 1
        return self._epoch(e)[k]

    @property
    def first_epoch(self) -> int:
        """The number of micro-batches that cover every pair at least once: the first epoch's."""
        return -(-self.n // self.cfg.batch_size) if self.sizes is None else len(self._epoch(0))


def lr_lambda(cfg: TrainConfig):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * done)) if cfg.schedule == "cosine" else max(0.0, 1 - done)
    return f


class StopSignals:
    """SIGINT and SIGTERM. Before the loop: stop at once (nothing to save). In the loop: finish the step, write a
    checkpoint, stop. A second signal stops at once."""

    def __init__(self):
        self.received = None
        self.in_loop = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        if not self.in_loop:
            raise Interrupted(f"{self.received} before training started; nothing to save")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():        # only there can handlers be set
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------------------------------------ the algorithm

def probe_head(model) -> None:
    """A class the head table does not know: accepted by the probe with a one-line notice, or refused."""
    notice = check_output_head(model)
    if notice:
        warnings.warn(notice, stacklevel=2)


def reference_model(cfg: TrainConfig, policy_model, dist: Dist):
    """--ref-model, checked: a head fastdpo can fuse, the policy's vocabulary, the run's layout."""
    device = dist.device
    ref = load_pretrained(cfg.ref_model, "--ref-model", cfg)
    probe_head(ref)
    output_head(ref)
    if ref.get_output_embeddings().weight.shape[0] != policy_model.get_output_embeddings().weight.shape[0]:
        raise ValueError(f"--ref-model {cfg.ref_model!r} has another vocabulary size than --model; the reference "
                         "must read the same token ids")
    if cfg.share_prompt or cfg.packing:
        resolve_layout(cfg, ref, device)           # the layout must hold for both models
    check_sequence_parallel(cfg, ref, dist, "--ref-model")
    if cfg.disable_dropout:
        disable_dropout(ref)
    return ref


def train(cfg: TrainConfig) -> dict:
    from tqdm.auto import tqdm

    with StopSignals() as stop, runs.RunLock(cfg.output_dir) as lock, contextlib.ExitStack() as scope:
        dist = Dist(cfg.fsdp, cfg.sequence_parallel)
        out = runs.check_output_dir(cfg, dist.dp, cache_dir(cfg))
        lock.hold(dist)                   # one writer per run directory (a new one is locked once it is made)
        ref_cache.remove_partial(cache_dir(cfg))
        device = dist.device
        dtype = compute_dtype(cfg, device)
        if cfg.max_tokens and dist.dp > 1:
            raise ValueError("--max-tokens with several data-parallel processes (or --sequence-parallel groups) is "
                             "not supported (the ranks' shares of a micro-batch would differ); use --batch-size")
        if dtype == torch.float16 and dist.fsdp:
            raise ValueError("--torch-dtype float16 with --fsdp is not supported (loss scaling of sharded "
                             "gradients); use bfloat16")

        def amp():
            return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        # 1. load
        train_pairs, eval_pairs = prefs.load_pairs(cfg.dataset, cfg.eval_fraction, cfg.seed, config=cfg.dataset_config,
                                                   split=cfg.dataset_split, eval_dataset=cfg.eval_dataset)
        tokenizer, model = load_model(cfg, train_pairs)
        probe_head(model)
        output_head(model)                          # a family whose head cannot be fused fails here, not later
        try:
            cfg.router_aux_loss_coef = router_aux_loss_coef(model, cfg.router_aux_loss_coef)
        except ValueError as e:
            raise ValueError(f"--router-aux-loss-coef: {e}") from None
        resolve_layout(cfg, model, device)
        check_sequence_parallel(cfg, model, dist)
        if cfg.disable_dropout:
            disable_dropout(model)
        train_ex = prefs.tokenize(train_pairs, tokenizer, cfg.max_length, "train")
        eval_ex = prefs.tokenize(eval_pairs, tokenizer, cfg.max_length, "eval")
        pad = tokenizer.pad_token_id
        stream = MicroBatches(train_ex, cfg)       # a pair over --max-tokens fails here
        ref_model = reference_model(cfg, model, dist) if cfg.ref_model else None
        model = with_lora(model, cfg)
        runs.start_run(cfg, dist, lock, runs.run_inputs(cfg, train_ex, eval_ex))
        source = model if ref_model is None else ref_model
        digest = None if cfg.reference_free else dist.from_main(ref_cache.model_digest(source) if dist.main else None)
        # on the device; with --fsdp sharded across the ranks; with --sequence-parallel each row split over a group
        policy = dist.wrap(ref_cache.Policy(model, dist.sequence_group))

        # 2. reference log-probs, once, then no reference model is kept: the initial policy's (LoRA adapters on,
        #    B = 0), or --ref-model's, through the training pass's function on its micro-batches
        ref_train = ref_eval = None
        if not cfg.reference_free:
            ref_policy = policy if ref_model is None else dist.wrap(ref_cache.Policy(ref_model, dist.sequence_group))
            import transformers
            settings = dict(fastdpo=__version__, torch=torch.__version__, transformers=transformers.__version__,
                            device=device.type, dtype=str(dtype), world=dist.world, fsdp=dist.fsdp, pad=pad,
                            attn=getattr(source.config, "_attn_implementation", None), batch_size=cfg.batch_size,
                            share_prompt=cfg.share_prompt, packing=cfg.packing, prompt_cache=cfg.prompt_cache,
                            span_attention=cfg.span_attention, max_tokens=cfg.max_tokens)
            settings["loss"] = cfg.loss_options()      # --ld-alpha weights the log-probs themselves
            if dist.sp > 1:                             # the sums add in another order
                settings["sequence_parallel"] = dist.sp
            ref_train = reference_logps("train", ref_policy, train_ex, pad, digest, {**settings, "seed": cfg.seed},
                                        cfg, dist, amp)
            ref_eval = reference_logps("eval", ref_policy, eval_ex, pad, digest, settings, cfg, dist, amp)
            del ref_policy, source, ref_model

        # 3. loop
        if cfg.gradient_checkpointing:       # transformers >= 5.2x names it activation checkpointing
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            if dist.sequence_group is not None:     # the backward's recompute attends as the forward did
                scope.enter_context(sequence_parallel.ulysses(model, dist.sequence_group))
        policy.train()
        params = [p for p in policy.parameters() if p.requires_grad]
        # fused: one kernel per step (the HF Trainer's default, adamw_torch_fused); on the CPU torch's default is
        # the per-tensor loop, ~0.1 s a step for 20 M parameters on 2 cores. FSDP's sharded parameters keep it.
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=not dist.fsdp)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        start, history = 0, []
        if cfg.resume:
            start, history = runs.load_checkpoint(runs.resume_path(cfg), model, optimizer, scheduler, scaler)
        report = Reporter(cfg, dist.main, history)
        pairs_per_step = cfg.grad_accum * cfg.batch_size
        num_tokens = next((r["num_tokens"] for r in reversed(history) if "num_tokens" in r), 0)
        before = evaluate(policy, eval_ex, ref_eval, pad, cfg, device, amp) if start == 0 else None
        if before:
            report.eval({"step": 0, "epoch": 0.0, **before})
        stop.in_loop = True
        bar = tqdm(range(start, cfg.steps), desc="training", disable=not (cfg.progress and dist.main), initial=start,
                   total=cfg.steps)
        for step in bar:
            totals, tokens, started = {}, 0, time.perf_counter()
            for micro in range(cfg.grad_accum):
                idx = stream(step * cfg.grad_accum + micro)
                with amp():
                    loss, metrics, n = pair_loss(policy, train_ex, dist.shard(idx), ref_train, pad, cfg, device)
                scaler.scale(loss / cfg.grad_accum).backward()
                tokens += n
                num_tokens += sum(2 * len(train_ex[i].prompt) + len(train_ex[i].chosen) + len(train_ex[i].rejected)
                                  for i in idx)
                for k, v in {"loss": loss, **metrics}.items():
                    totals[k] = totals.get(k, 0.0) + v.detach().float() / cfg.grad_accum
            dist.average_grads(params)
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch = (step + 1) * pairs_per_step / len(train_ex)
            record = {"step": step + 1, "epoch": epoch, "learning_rate": scheduler.get_last_lr()[0],
                      "grad_norm": float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm),
                      **{k: dist.mean_(v).item() for k, v in totals.items()},
                      # TRL's num_tokens: tokens of prompt + chosen and prompt + rejected so far, no padding;
                      # this process's wall time for the step and the positions its backbone computed (padding in)
                      "num_tokens": num_tokens, "step_time_s": time.perf_counter() - started,
                      "tokens_computed": tokens}
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}")
            stopping = dist.any(stop.received is not None)
            report.train(record, last=step + 1 == cfg.steps or stopping)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                report.eval({"step": step + 1, "epoch": epoch,
                             **evaluate(policy, eval_ex, ref_eval, pad, cfg, device, amp)})
            if stopping:
                runs.save_checkpoint(cfg, model, optimizer, scheduler, scaler, step + 1, epoch, report.history,
                                     dist.main)
                bar.close()
                raise Interrupted(f"{stop.received or 'a signal to another process'} at step {step + 1}: "
                                  f"checkpoint written to {os.path.join(out, f'checkpoint-{step + 1}')}; continue "
                                  "with --resume")
            if step + 1 < cfg.steps and cfg.save_every and (step + 1) % cfg.save_every == 0:
                runs.save_checkpoint(cfg, model, optimizer, scheduler, scaler, step + 1, epoch, report.history,
                                     dist.main)

        # 4. save
        after = evaluate(policy, eval_ex, ref_eval, pad, cfg, device, amp)
        report.eval({"step": cfg.steps, "epoch": cfg.steps * pairs_per_step / len(train_ex), **after})
        summary = {"before": before, "after": after, "train_examples": len(train_ex), "eval_examples": len(eval_ex)}
        model_state = runs.save_checkpoint(cfg, model, optimizer, scheduler, scaler, cfg.steps,
                                           cfg.steps * pairs_per_step / len(train_ex), report.history, dist.main)
        if dist.main:
            report.close()
            final = os.path.join(out, "model")
            with runs.writing(final, "--output-dir", note=f"; checkpoint-{cfg.steps} holds the trained weights"):
                model.save_pretrained(final, state_dict=dict(model_state))
                tokenizer.save_pretrained(final)
                summary.update(plot=plot(out, report.history), model=final)
                with open(os.path.join(out, "summary.json"), "w") as f:
                    json.dump(summary, f, indent=2)
        dist.barrier()
        return summary
