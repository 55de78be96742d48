"""TRL's DPOTrainer with fastdpo's log-probs and loss: change one import, keep the rest.

    from fastdpo.integrations.trl import FastDPOTrainer     # was: from trl import DPOTrainer
    trainer = FastDPOTrainer(model="Qwen/Qwen3-0.6B", args=DPOConfig(...), train_dataset=data)

TRL 1.16's DPOTrainer computes log-probs in two methods; these are the two FastDPOTrainer overrides:
- ``compute_ref_log_probs`` (the reference pass; what ``precompute_ref_log_probs`` caches):
  ``fastdpo.model_sequence_logps`` under no-grad, with TRL's adapter switch for PEFT and its autocast.
- ``_compute_loss`` (each training and evaluation batch): ``fastdpo.model_dpo_loss`` (backbone, fused head
  and fused loss; the ``[tokens, vocab]`` logits never exist, prompt and padding positions are never scored),
  then TRL's metrics from the same log-probs; for an MoE model, the router's load-balancing loss (``aux_loss``)
  as TRL adds it.
The model (a name, loaded by TRL, or an instance) is checked once it exists: a class fastdpo's head table does
not know is probed (``fastdpo.models.check_output_head``) and accepted with a notice or refused. A ``ref_model``
name, which TRL 1.16 does not take, is loaded as TRL loads the policy.
The pair layout (``fastdpo/integrations/_trl_layout.py``; on where ``fastdpo.heads.supports_layout`` verifies the
class, as in ``fastdpo train``; ``padding_free=True`` asks for it, ``FastDPOTrainer(..., pair_layout=False)`` turns it
off): TRL's collator is wrapped so that each batch, truncated as TRL truncates it, becomes one sequence
``[prompt, chosen, rejected]`` per pair, packed without padding, and both methods above run
``fastdpo.model_pair_dpo_loss`` / ``model_pair_logps`` on it: each prompt runs once, the log-probs are the padded
layout's. Logged besides TRL's metrics: ``fastdpo/positions``, the positions the backbone computed.
Datasets, tokenization, the collator (wrapped, as above), PEFT, the reference model and its precomputation,
accelerate, optimizer, scheduler, logging and checkpoints stay TRL's own code. Both passes run through the
model's (the engine's) forward and the fused head inside the lm_head's (``fastdpo.models.head_call``):
DeepSpeed ZeRO-1/2/3 and FSDP2 gather and reduce its parameters as for TRL's own head. Not logged: ``entropy``,
``logits/chosen``, ``logits/rejected`` and ``mean_token_accuracy``, per-token statistics of the full-vocabulary
distribution that the fused op does not form. Under accelerate's sequence parallelism
(``ParallelismConfig(sp_size=N)``, DeepSpeed) each group of N processes splits the pair layout's rows with
fastdpo's own Ulysses attention (``_trl_sequence``). Options FastDPOTrainer cannot honour raise a ValueError at
construction (``REFUSED``, what ``_trl_sequence`` cannot split exactly, ``use_liger_kernel`` in TRL's words, and
the checks of ``_check_inputs`` and ``_check_loaded``); fastdpo also refuses a few loss settings TRL only warns
about (e.g. ``label_smoothing`` where no chosen loss uses it).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types
import warnings

try:
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import create_model_from_path, get_config_model_id, use_adapter
except ImportError as e:
    raise ImportError(f"fastdpo.integrations.trl needs TRL: pip install trl ({e})") from e
if not all(hasattr(DPOTrainer, name) for name in ("_compute_loss", "compute_ref_log_probs")):
    raise ImportError("fastdpo.integrations.trl needs the DPOTrainer of TRL >= 1.16 (with _compute_loss and "
                      "compute_ref_log_probs): pip install -U trl")

import torch  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from transformers import ProcessorMixin, Trainer  # noqa: E402

from ..heads import router_aux_loss_coef  # noqa: E402
from ..loss import LOSS_DEFAULTS, make_params  # noqa: E402
from ..models import check_output_head, model_dpo_loss, model_sequence_logps, output_head  # noqa: E402
from .. import sequence_parallel  # noqa: E402
from . import _trl_layout, _trl_sequence  # noqa: E402

_DPO_SIGNATURE = inspect.signature(DPOTrainer.__init__)
# Keys of TRL's preference batches that are not model inputs; the model inputs fastdpo's forward takes.
NOT_MODEL_INPUTS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# TRL 1.16's words for use_liger_kernel=True (a FutureWarning there; TRL then applies Liger's layer kernels)
LIGER_DEPRECATED = ("`use_liger_kernel=True` is deprecated and will be removed in v2.0.0. Use the Hub kernels instead, "
                    'with `model_init_kwargs={"use_kernels": True}`.')
# DPOConfig (TrainingArguments) options refused when set, and why.
REFUSED = {
    "torch_compile": "not verified: under torch.compile fastdpo's ops break the graph where they read scored-token "
                     "counts on the host (Tensor.item); tried on the CPU with TRL 1.16, the first step equalled "
                     "DPOTrainer's, the second had not finished recompiling after 15 minutes",
}


def _refuse_options(args) -> None:
    if args.use_liger_kernel:
        # TRL's deprecation, word for word, then fastdpo's refusal (Liger patches the layers fastdpo runs)
        warnings.warn(LIGER_DEPRECATED, FutureWarning, stacklevel=3)
        raise ValueError(f"{LIGER_DEPRECATED} FastDPOTrainer does not run Liger's kernels (they patch the model's "
                         "layers; not verified with fastdpo's head): unset use_liger_kernel, or use trl.DPOTrainer")
    for name, why in REFUSED.items():
        value = getattr(args, name, None)
        if value:
            raise ValueError(f"FastDPOTrainer: {name}={value!r} is not supported: {why}. Unset it, or use "
                             "trl.DPOTrainer")


def _loss_options(args) -> dict:
    """DPOConfig's loss options as ``model_dpo_loss`` takes them, checked by fastdpo now rather than at step 1."""
    options = dict(beta=args.beta, loss_type=list(args.loss_type), loss_weights=args.loss_weights,
                   label_smoothing=args.label_smoothing, f_divergence_type=args.f_divergence_type,
                   f_alpha_divergence_coef=args.f_alpha_divergence_coef, discopop_tau=args.discopop_tau,
                   ld_alpha=args.ld_alpha, use_weighting=args.use_weighting)
    try:
        make_params(options["loss_type"], options["loss_weights"], options["beta"], options["label_smoothing"],
                    options["f_divergence_type"], options["f_alpha_divergence_coef"], LOSS_DEFAULTS["gamma"],
                    options["discopop_tau"], ld_alpha=options["ld_alpha"], use_weighting=options["use_weighting"])
    except ValueError as e:
        raise ValueError(f"FastDPOTrainer: DPOConfig: {e}") from None
    return options


def _checked_model(lm, args=None) -> float:
    """Check one loaded model for fastdpo: its head (a class the head table does not know is probed, with a
    notice); for the policy (``args`` given), the MoE load-balancing coefficient TRL would use (returned)."""
    notice = check_output_head(lm)
    if notice:
        warnings.warn(notice, stacklevel=4)
    output_head(lm)                             # a head fastdpo cannot fuse raises, naming the model's class
    if args is None:
        return 0.0
    try:
        return router_aux_loss_coef(_base(lm), args.router_aux_loss_coef)
    except ValueError as e:
        raise ValueError(f"FastDPOTrainer: {e}") from None


def _base(lm):
    return lm.get_base_model() if is_peft_model(lm) else lm


def _refuse_prompt_learning(peft) -> None:
    if peft is not None and peft.is_prompt_learning:
        raise ValueError(f"FastDPOTrainer: prompt-learning PEFT ({peft.peft_type}) is not supported: its virtual "
                         "tokens enter through inputs_embeds or the key/value cache, which fastdpo's forward does not "
                         "take. Use an adapter such as LoRA")


def _refuse_vision(processing_class, sample) -> None:
    if isinstance(processing_class, ProcessorMixin) or "image" in sample or "images" in sample:
        raise ValueError("FastDPOTrainer: vision-language models and image datasets are not supported: fastdpo's "
                         "forward takes input_ids and attention_mask only")


def _check_inputs(model, ref_model, args, train_dataset, processing_class, peft_config) -> None:
    """What can be refused before TRL's constructor runs (and loads models or precomputes the reference)."""
    if not isinstance(model, str):
        _checked_model(model, args)
    if ref_model is not None and not isinstance(ref_model, str):
        _checked_model(ref_model)
    if peft_config is not None:
        _refuse_prompt_learning(peft_config)
    elif not isinstance(model, str) and is_peft_model(model):
        _refuse_prompt_learning(model.active_peft_config)
    _refuse_vision(processing_class, next(iter(train_dataset)) if train_dataset is not None else {})


def _load_reference(name: str, args, quantization_config):
    """A reference model given by name: loaded as TRL 1.16's DPOTrainer loads the policy from a name
    (``model_init_kwargs``, ``trust_remote_code``). TRL itself takes only a model instance (or None) there."""
    kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(name, **kwargs)


def _route_forward(model) -> None:
    """``model(fastdpo=fn)`` runs ``fn(model)`` inside the model's forward; any other call is the forward as it was.

    The policy pass must go through ``model(...)``: accelerate wraps the forward of the model it prepares (DDP's
    gradient synchronization, mixed-precision autocast), and a call of the backbone and head from outside would
    miss those wrappers. TRL attaches its own fused head to the forward the same way."""
    if vars(model).get("_fastdpo_routed"):
        return
    original = model.forward

    @functools.wraps(original)
    def forward(self, *args, fastdpo=None, **kwargs):
        return original(*args, **kwargs) if fastdpo is None else fastdpo(self)

    model.forward = types.MethodType(forward, model)
    model._fastdpo_routed = True


def _layout_wanted(pair_layout, padding_free):
    """FastDPOTrainer's pair_layout keyword (None: where verified) with DPOConfig's padding_free (True: required)."""
    if pair_layout not in (None, True, False):
        raise ValueError(f"FastDPOTrainer: pair_layout must be None (on where verified), True or False, got "
                         f"{pair_layout!r}")
    if padding_free and pair_layout is False:
        raise ValueError("FastDPOTrainer: padding_free=True is the pair layout; it contradicts pair_layout=False")
    return True if padding_free else pair_layout


def _scorable(inputs: dict) -> dict:
    """TRL's padded batch with at least 2 positions. A batch of one-token sequences (empty prompts, replies of only
    EOS) scores nothing, and TRL's DPOTrainer gives it log-probs 0; fastdpo's head needs a position to predict from,
    so one more padding column (masked, not scored) is added, which changes nothing else."""
    if inputs["input_ids"].shape[1] >= 2:
        return inputs
    widened = dict(inputs)
    for key in ("input_ids", "attention_mask", "completion_mask", "position_ids"):
        if key in inputs:
            widened[key] = torch.nn.functional.pad(inputs[key], (0, 1))
    return widened


def _labels(inputs) -> torch.Tensor:
    """TRL's labels: the completion tokens, -100 elsewhere (Hugging Face style, shifted inside fastdpo)."""
    return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)


class FastDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` (same arguments, same outputs) whose log-probs and loss come from fastdpo's fused ops.

    See the module docstring for what is overridden, what is not logged and which options raise."""

    _tag_names = [*DPOTrainer._tag_names, "fastdpo"]

    def __init__(self, *args, pair_layout=None, **kwargs):
        given = _DPO_SIGNATURE.bind(self, *args, **kwargs).arguments
        del given["self"]
        model = given.get("model")
        if given.get("args") is None:             # TRL's default DPOConfig, made as TRL makes it
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            given["args"] = DPOConfig(f"{name.split('/')[-1]}-DPO")
        config = given["args"]
        _refuse_options(config)
        self._fastdpo_layout_wanted = _layout_wanted(pair_layout, config.padding_free)
        parallelism = getattr(config, "parallelism_config", None)
        sp = _trl_sequence.check_config(parallelism, config, self._fastdpo_layout_wanted,
                                        "DPOConfig.parallelism_config")
        _loss_options(config)
        _check_inputs(model, given.get("ref_model"), config, given.get("train_dataset"),
                      given.get("processing_class"), given.get("peft_config"))
        for what, lm in (("the model", model), ("the ref_model", given.get("ref_model"))):
            if sp > 1 and lm is not None and not isinstance(lm, str):
                _trl_sequence.check_model(lm, sp, parallelism, what)
        if isinstance(given.get("ref_model"), str):
            given["ref_model"] = _load_reference(given["ref_model"], config, given.get("quantization_config"))
        self._fastdpo_checked = False
        self._fastdpo_group = None                  # the SequenceGroup, once accelerate made it (sp_size > 1)
        padding_free, config.padding_free = config.padding_free, False      # not TRL's fallback warning
        try:
            super().__init__(**given)
        finally:
            config.padding_free = padding_free
        self._check_loaded()                    # a model given by name: checked here (or before the precompute)
        _route_forward(self.model)

    __init__.__signature__ = _DPO_SIGNATURE.replace(parameters=[
        *_DPO_SIGNATURE.parameters.values(),
        inspect.Parameter("pair_layout", inspect.Parameter.KEYWORD_ONLY, default=None)])

    def _check_loaded(self) -> None:
        """The checks on what TRL's constructor loaded or made (a model by name, its processor, PEFT, the default
        reference), once: before TRL precomputes reference log-probs, else at the end of the constructor."""
        if self._fastdpo_checked:
            return
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        sp = _trl_sequence.check_config(parallelism, self.args, self._fastdpo_layout_wanted,
                                        "accelerate's parallelism_config", self.is_deepspeed_enabled)
        self._fastdpo_options = _loss_options(self.args)
        coef = _checked_model(self.model, self.args)
        if self.ref_model is not None:
            _checked_model(self.accelerator.unwrap_model(self.ref_model))
        if sp > 1:
            _trl_sequence.check_model(self.model, sp, parallelism, "the model")
            if self.ref_model is not None:
                _trl_sequence.check_model(self.accelerator.unwrap_model(self.ref_model), sp, parallelism,
                                          "the ref_model")
        if is_peft_model(self.model):
            _refuse_prompt_learning(self.model.active_peft_config)
        _refuse_vision(self.processing_class, {})
        if coef:                                # the MoE load-balancing loss, with TRL's coefficient
            self._fastdpo_options = {**self._fastdpo_options, "router_aux_loss_coef": coef}
        self._fastdpo_layout = self._pair_layout(bool(coef), sp)
        self._fastdpo_attention = {}            # sp_size > 1: transformers' core attention, before DeepSpeed's
        if sp > 1:          # accelerate's DeepSpeed attention and data adapter, replaced once the model is prepared
            self._fastdpo_attention = _trl_sequence.saved_attention()
            _trl_sequence.take_over(self, self._fastdpo_attention)
        self._fastdpo_checked = True

    def _pair_layout(self, aux_loss: bool, sp: int = 1):
        """The pair layout (``_trl_layout``) where wanted and verified: TRL's collator wrapped; else None."""
        why = _trl_layout.layout_unavailable(self.model, aux_loss)
        if why is None and self.ref_model is not None:
            why = _trl_layout.layout_unavailable(self.accelerator.unwrap_model(self.ref_model), False)
        if why is None and type(self.data_collator) is not DataCollatorForPreference:
            why = f"a data_collator of its own ({type(self.data_collator).__name__}) was given"
        if why is None and self.compute_metrics is not None:
            why = "compute_metrics takes the logits of TRL's padded batches"
        if sp > 1:
            _trl_sequence.refuse_without_layout(why, sp)
        if self._fastdpo_layout_wanted is False or (why and self._fastdpo_layout_wanted is None):
            return None
        if why:
            raise ValueError(f"FastDPOTrainer: the pair layout (pair_layout=True or padding_free=True): {why}. "
                             "Use pair_layout=False")
        models = [self.model] + ([] if self.ref_model is None else [self.accelerator.unwrap_model(self.ref_model)])
        layout = _trl_layout.resolve(models, self.args, self.args.device, split=sp > 1)
        self.data_collator = _trl_layout.PairCollator(self.data_collator, layout)
        self.padding_free = True
        return layout

    def _track_num_input_tokens(self, inputs):
        """``include_num_input_tokens_seen`` on a layout batch: the count of TRL's padded batch of the same pairs
        (transformers finds no ``input_ids`` in it, and would warn and count nothing)."""
        mode = self.args.include_num_input_tokens_seen
        if mode == "no" or not _trl_layout.is_layout_batch(inputs):
            return super()._track_num_input_tokens(inputs)
        tokens = _trl_layout.input_tokens(inputs, mode).to(self.args.device, torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item() // self._copies(inputs)

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        """A run resumed mid-epoch: the sequence-parallel loader skips the group's batches already trained on."""
        if isinstance(dataloader, _trl_sequence.GroupLoader):
            return dataloader.resumed(num_batches)
        return super().get_resumed_dataloader(dataloader, num_batches)

    def _precompute_ref_logps(self, *args, **kwargs):
        self._check_loaded()
        return super()._precompute_ref_logps(*args, **kwargs)

    def _group(self, inputs):
        """The SequenceGroup that splits ``inputs`` (a batch of ``_trl_sequence.GroupLoader``), else None."""
        if not inputs.get(_trl_sequence.GROUP):
            return None
        if not _trl_layout.is_layout_batch(inputs):
            raise ValueError(f"FastDPOTrainer: sp_size={self._fastdpo_group.size}: a batch the pair layout cannot hold "
                             "exactly (a reply truncated to nothing, or keep_end cutting the two prompts differently) "
                             "cannot be split over the sequence-parallel group; raise max_length or use "
                             "truncation_mode='keep_start'")
        return self._fastdpo_group

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        size = _trl_sequence.sizes(getattr(self.accelerator, "parallelism_config", None))[0]
        _trl_sequence.check_resume(size, resume_from_checkpoint, self.args, Trainer)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        """Trainer's step; a group's batch under gradient checkpointing with fastdpo's split attention held through
        the backward, whose recompute runs it again (``fastdpo.sequence_parallel.ulysses``)."""
        group = self._group(inputs) if self.args.gradient_checkpointing else None
        if group is None:
            return super().training_step(model, inputs, *args, **kwargs)
        with sequence_parallel.ulysses(self.accelerator.unwrap_model(model), group):
            return super().training_step(model, inputs, *args, **kwargs)

    def _copies(self, inputs) -> int:
        """How many processes hold ``inputs`` whole (a group's batch: each rank of the group)."""
        group = self._group(inputs)
        return 1 if group is None else group.size

    def _sequence_logps(self, model, inputs) -> torch.Tensor:
        """[2B] log-probs of a TRL batch (LD-DPO-weighted under ld_alpha, as TRL's)."""
        if _trl_layout.is_layout_batch(inputs):
            return _trl_layout.pair_logps(model, inputs, self._fastdpo_layout, self.ld_alpha, self._group(inputs))
        inputs = _scorable(inputs)
        kwargs = {k: inputs[k] for k in MODEL_INPUTS[1:] if k in inputs}
        if self.ld_alpha is None:
            return model_sequence_logps(model, inputs["input_ids"], _labels(inputs), **kwargs)
        # model_sequence_logps gives plain sums; model_dpo_loss's log-probs are the LD-weighted ones (its
        # reference-free loss is dropped)
        return model_dpo_loss(model, inputs["input_ids"], _labels(inputs), ld_alpha=self.ld_alpha,
                              return_logps=True, **kwargs)[2]

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs (chosen [B], rejected [B]) of a padded batch, through fastdpo's fused head."""
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            peft_model = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None)
        _route_forward(self.accelerator.unwrap_model(model, keep_torch_compile=False))   # a model TRL prepared
        _trl_sequence.restore(self._fastdpo_attention)
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              adapter, self.accelerator.autocast()):
            # through the model's (engine's) forward: DeepSpeed's and FSDP's hooks gather the sharded parameters
            logps = model(fastdpo=functools.partial(self._sequence_logps, inputs=inputs))
        return logps.chunk(2)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        _trl_sequence.restore(self._fastdpo_attention)
        layout = _trl_layout.is_layout_batch(inputs)
        if not layout:
            inputs = _scorable(inputs)
        model_inputs = {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}
        extra = sorted(set(model_inputs) - set(MODEL_INPUTS))
        group = self._group(inputs)
        if layout and return_outputs:
            raise ValueError("FastDPOTrainer: return_outputs=True (the logits for compute_metrics) needs TRL's padded "
                             "batches: pass pair_layout=False")
        if extra and not layout:
            raise ValueError(f"FastDPOTrainer: the batch has model inputs {extra}; fastdpo's forward takes "
                             f"{list(MODEL_INPUTS)} only")
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(
                self.model if self.ref_model is None else self.ref_model, inputs)
        options = {k: v for k, v in model_inputs.items() if k != "input_ids"} | self._fastdpo_options

        def policy(unwrapped):
            if layout:
                return _trl_layout.pair_dpo_loss(unwrapped, inputs, self._fastdpo_layout, ref_chosen, ref_rejected,
                                                 return_logps=True, group=group, **self._fastdpo_options)
            return model_dpo_loss(unwrapped, inputs["input_ids"], _labels(inputs), ref_chosen, ref_rejected,
                                  return_logps=True, **options)

        loss, metrics, logps = model(fastdpo=policy)
        if group is not None and self._fastdpo_gradient_factor != 1:     # the engine's reduction over the group
            loss = _trl_sequence.ScaleGradient.apply(loss, self._fastdpo_gradient_factor)
        if "aux_loss" in metrics:               # logged as TRL logs it
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(metrics["aux_loss"]).mean()
                                                   .item())
        self._log_batch_metrics(mode, inputs, logps, ref_chosen, ref_rejected)
        if not return_outputs:
            return loss
        warnings.warn("`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated in TRL "
                      "and recomputed with an extra forward pass (full logits), as TRL's DPOTrainer does.",
                      FutureWarning, stacklevel=2)
        with torch.no_grad():
            return loss, model(**model_inputs)

    def _log_batch_metrics(self, mode, inputs, logps, ref_chosen, ref_rejected) -> None:
        """TRL's metrics of one batch, gathered across processes as TRL gathers them."""
        copies = self._copies(inputs)            # a sequence-parallel group's batch is on each of its ranks
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(_trl_layout.num_tokens(inputs)).sum().item()
            self._total_train_tokens += tokens // self._tp_size // copies
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        positions = torch.tensor(_trl_layout.positions(inputs), device=self.accelerator.device)
        self._metrics[mode][_trl_layout.POSITIONS].append(self.accelerator.gather(positions).sum().item() // copies)
        chosen, rejected = logps.chunk(2)
        chosen_rewards, rejected_rewards = self.beta * (chosen - ref_chosen), self.beta * (rejected - ref_rejected)
        values = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                  "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                  "rewards/margins": chosen_rewards - rejected_rewards,
                  "logps/chosen": chosen, "logps/rejected": rejected}
        for key, value in values.items():
            self._metrics[mode][key].append(self.accelerator.gather(value).mean().item())
