"""What each Hugging Face causal-LM family's forward does around its output head: the one place that knows.

Each entry was read off the family's ``forward`` in transformers (``logits = self.lm_head(hidden_states)`` and the
lines around it) and checked once on a tiny random model of that class; ``tests/test_models.py`` keeps testing
the families with a head of their own and a sample of the plain ones against the plain path. A family's forward
may scale the logits, divide them, or softcap them; the values come from the attributes that forward reads, at
call time. A class that is not in the table (another family, remote code) raises, unless a probe of that model
(``fastdpo.models.check_output_head``) found its own logits equal to the fused path's. The MoE load-balancing
loss, as TRL adds it, is here too.
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from functools import reduce
from typing import Optional

from torch import nn


@dataclass(frozen=True)
class HeadRule:
    """logits = softcap(lm_head(backbone(...)) * prod(multiply) / prod(divide)), softcap(x) = c·tanh(x / c).

    Attribute paths are read on the causal-LM module (``"config.logits_scaling"``, ``"logit_scale"``)."""
    backbone: str = "model"                  # the attribute the forward runs before lm_head
    multiply: tuple = ()
    divide: tuple = ()
    softcap: Optional[str] = None

    def transform(self, lm) -> tuple:
        """(logit_scale, softcap) of the fused op for this model, read now."""
        scale = (reduce(operator.mul, (float(_get(lm, p)) for p in self.multiply), 1.0)
                 / reduce(operator.mul, (float(_get(lm, p)) for p in self.divide), 1.0))
        cap = None if self.softcap is None else _get(lm, self.softcap)
        return scale, (None if cap is None else float(cap))

    def backbone_of(self, lm):
        return _get(lm, self.backbone)


def _get(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


PLAIN = HeadRule()
SOFTCAP = HeadRule(softcap="config.final_logit_softcapping")      # skipped when the config holds None
DIVIDE_SCALING = HeadRule(divide=("config.logits_scaling",))       # MiniCPM3 divides h before the head: the same
COHERE = HeadRule(multiply=("logit_scale",))                       # copied from config.logit_scale at __init__

# logits = lm_head(self.model(...).last_hidden_state), nothing else (transformers 5.24; a final .float() or a
# multimodal wrapper's text-only path included)
PLAIN_CLASSES = (
    "AXK1ForCausalLM", "AXK2ForCausalLM", "AfmoeForCausalLM", "Apertus1p5TextForCausalLM", "ApertusForCausalLM",
    "ArceeForCausalLM", "AriaTextForCausalLM", "BailingHybridForCausalLM", "BambaForCausalLM", "BitNetForCausalLM",
    "BltForCausalLM", "CwmForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV32ForCausalLM", "DeepseekV3ForCausalLM",
    "DeepseekV4ForCausalLM", "DiffLlamaForCausalLM", "DogeForCausalLM", "Dots1ForCausalLM", "Dots3NoteForCausalLM",
    "Emu3ForCausalLM", "Ernie4_5ForCausalLM", "Ernie4_5_MoeForCausalLM", "Exaone4ForCausalLM", "ExaoneMoeForCausalLM",
    "FlexOlmoForCausalLM", "FlintForCausalLM", "FuyuForCausalLM", "Gemma3ForConditionalGeneration",
    "GemmaForCausalLM", "Glm4ForCausalLM", "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM", "GlmForCausalLM",
    "GlmMoeDsaForCausalLM", "GotOcr2ForConditionalGeneration", "GptOssForCausalLM", "HYV3ForCausalLM",
    "HeliumForCausalLM", "HrmTextForCausalLM", "HunYuanDenseV1ForCausalLM", "HunYuanMoEV1ForCausalLM",
    "Jais2ForCausalLM", "JambaForCausalLM", "JetMoeForCausalLM", "KimiLinearForCausalLM", "Kolibri1ForCausalLM",
    "LagunaForCausalLM", "LaraMiniForCausalLM", "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "Lfm3ForCausalLM",
    "Llama4ForCausalLM", "LlamaForCausalLM", "LongcatFlashForCausalLM", "MellumForCausalLM", "MiMoV2FlashForCausalLM",
    "MiniMaxForCausalLM", "MiniMaxM2ForCausalLM", "MiniMaxM3VLForCausalLM", "Ministral3ForCausalLM",
    "MinistralForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "MllamaForCausalLM", "MoshiForCausalLM",
    "MossTranscribeDiarizeForConditionalGeneration", "NemotronForCausalLM", "NemotronHForCausalLM",
    "Olmo2ForCausalLM", "Olmo3ForCausalLM", "OlmoForCausalLM", "OlmoHybridForCausalLM", "OlmoeForCausalLM",
    "PersimmonForCausalLM", "Phi3ForCausalLM", "Phi4MultimodalForCausalLM", "PhiForCausalLM", "PhimoeForCausalLM",
    "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM",
    "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen4ExpForCausalLM", "SeedOssForCausalLM", "SmolLM3ForCausalLM",
    "SolarOpenForCausalLM", "StableLmForCausalLM", "Starcoder2ForCausalLM", "XGLMForCausalLM", "YoutuForCausalLM",
    "Zamba2ForCausalLM", "ZambaForCausalLM", "ZayaForCausalLM",
)

# causal-LM class name -> rule: every class of transformers' MODEL_FOR_CAUSAL_LM_MAPPING whose forward the fused
# head reproduces. Each was checked on a tiny random model (transformers 5.24): model(ids).logits equal, bitwise,
# to the rule applied to lm_head(backbone(ids)). Left out on purpose: heads with an MLP before the vocabulary
# projection (BERT, RoBERTa, ELECTRA, ModernBERT-decoder, ...), several heads per step (MusicGen), logits from
# another stream (ProphetNet), a learned per-token scale (Dory), a vocabulary slice or a cap applied in another
# order (Inkling, xLSTM), and the Gemma4/Gemma3n multimodal wrappers and assistants.
HEADS = {
    **{name: PLAIN for name in PLAIN_CLASSES},
    "BartForCausalLM": HeadRule(backbone="model.decoder"),
    "BigBirdPegasusForCausalLM": HeadRule(backbone="model.decoder"),
    "BlenderbotForCausalLM": HeadRule(backbone="model.decoder"),
    "BlenderbotSmallForCausalLM": HeadRule(backbone="model.decoder"),
    "MBartForCausalLM": HeadRule(backbone="model.decoder"),
    "MarianForCausalLM": HeadRule(backbone="model.decoder"),
    "MvpForCausalLM": HeadRule(backbone="model.decoder"),
    "OPTForCausalLM": HeadRule(backbone="model.decoder"),
    "PLBartForCausalLM": HeadRule(backbone="model.decoder"),
    "PegasusForCausalLM": HeadRule(backbone="model.decoder"),
    "TrOCRForCausalLM": HeadRule(backbone="model.decoder"),
    "WhisperForCausalLM": HeadRule(backbone="model.decoder"),
    "BeamForCausalLM": SOFTCAP,
    "Gemma2ForCausalLM": SOFTCAP,
    "Gemma3ForCausalLM": SOFTCAP,
    "Gemma3nForCausalLM": SOFTCAP,
    "Gemma4ForCausalLM": SOFTCAP,
    "Gemma4UnifiedForCausalLM": SOFTCAP,
    "NanoChatForCausalLM": SOFTCAP,
    "VaultGemmaForCausalLM": SOFTCAP,
    "BertGenerationDecoder": HeadRule(backbone="bert"),
    "BioGptForCausalLM": HeadRule(backbone="biogpt"),
    "BloomForCausalLM": HeadRule(backbone="transformer"),
    "CTRLLMHeadModel": HeadRule(backbone="transformer"),
    "CodeGenForCausalLM": HeadRule(backbone="transformer"),
    "DbrxForCausalLM": HeadRule(backbone="transformer"),
    "FalconForCausalLM": HeadRule(backbone="transformer"),
    "GPT2LMHeadModel": HeadRule(backbone="transformer"),
    "GPTBigCodeForCausalLM": HeadRule(backbone="transformer"),
    "GPTJForCausalLM": HeadRule(backbone="transformer"),
    "GPTNeoForCausalLM": HeadRule(backbone="transformer"),
    "MptForCausalLM": HeadRule(backbone="transformer"),
    "OpenAIGPTLMHeadModel": HeadRule(backbone="transformer"),
    "XLMWithLMHeadModel": HeadRule(backbone="transformer"),
    "XLNetLMHeadModel": HeadRule(backbone="transformer"),
    "Cohere2ForCausalLM": COHERE,
    "Cohere2MoeForCausalLM": COHERE,
    "CohereForCausalLM": COHERE,
    "CpmAntForCausalLM": HeadRule(backbone="cpmant"),
    "FalconH1ForCausalLM": HeadRule(multiply=("model.lm_head_multiplier",)),
    "FalconMambaForCausalLM": HeadRule(backbone="backbone"),
    "Mamba2ForCausalLM": HeadRule(backbone="backbone"),
    "MambaForCausalLM": HeadRule(backbone="backbone"),
    "GPTNeoXForCausalLM": HeadRule(backbone="gpt_neox"),
    "GPTNeoXJapaneseForCausalLM": HeadRule(backbone="gpt_neox_japanese"),
    "GitForCausalLM": HeadRule(backbone="git"),
    "GraniteForCausalLM": DIVIDE_SCALING,
    "GraniteMoeForCausalLM": DIVIDE_SCALING,
    "GraniteMoeHybridForCausalLM": DIVIDE_SCALING,
    "GraniteMoeSWAForCausalLM": DIVIDE_SCALING,
    "GraniteMoeSharedForCausalLM": DIVIDE_SCALING,
    "GraniteSWAForCausalLM": DIVIDE_SCALING,
    "MiniCPM3ForCausalLM": DIVIDE_SCALING,
    "HyperCLOVAXForCausalLM": HeadRule(multiply=("config.logits_scaling",)),
    "RecurrentGemmaForCausalLM": HeadRule(softcap="config.logits_soft_cap"),
    "ReformerModelWithLMHead": HeadRule(backbone="reformer"),
    "RwkvForCausalLM": HeadRule(backbone="rwkv"),
}


def model_class(lm) -> type:
    """``lm``'s class; under FSDP2 the class ``fully_shard`` derived from it (FSDP<name>, bases FSDPModule and it)
    stands for the model's own."""
    cls = type(lm)
    if cls.__module__.startswith("torch.distributed.fsdp"):
        cls = next((b for b in cls.__bases__ if not b.__module__.startswith("torch.distributed.fsdp")), cls)
    return cls


# Models of a class the table does not know, accepted one by one by fastdpo.models.check_output_head's probe
# (their own logits against the fused path's, at load): model -> the rule the probe checked.
_PROBED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def known_rule(lm) -> Optional[HeadRule]:
    """The rule of ``lm``: its class's entry (transformers' own class of that name), or the one a probe accepted
    for this model; None when neither."""
    cls = model_class(lm)
    if cls.__module__.startswith("transformers.models.") and cls.__name__ in HEADS:
        return HEADS[cls.__name__]
    return _PROBED.get(lm)


def probe_rule(lm) -> HeadRule:
    """The rule a probe tries for a class the table does not know: ``logits = lm_head(<base_model_prefix>(...))``."""
    prefix = getattr(lm, "base_model_prefix", "")
    if not prefix or not isinstance(getattr(lm, prefix, None), nn.Module):
        raise ValueError(unknown_head(lm, f"its backbone is not found at base_model_prefix {prefix!r}"))
    return HeadRule(backbone=prefix)


def accept_probed(lm, rule: HeadRule) -> None:
    _PROBED[lm] = rule


def unknown_head(lm, why: str) -> str:
    cls = model_class(lm)
    origin = "remote code" if not cls.__module__.startswith("transformers.") else "transformers"
    return (f"fastdpo does not know the output head of {cls.__name__} ({origin}, module {cls.__module__}) and {why}: "
            "its forward may scale, cap or otherwise change the logits, and a fused head that missed it would give "
            "wrong log-probs. Known classes are listed in fastdpo.heads.HEADS; a family whose forward is "
            "`logits = lm_head(backbone(...))` (or scales/caps it) can be added there with a test.")


def head_rule(lm) -> HeadRule:
    """The rule of ``lm``: its class's entry (transformers' own class of that name), or the rule a probe accepted."""
    rule = known_rule(lm)
    if rule is None:
        raise ValueError(unknown_head(lm, "no probe accepted it (fastdpo.models.check_output_head)"))
    return rule


# ------------------------------------------------------------------------------ MoE: the router's load-balancing loss
# As TRL 1.16's DPOTrainer adds it (its __init__ and trl.trainer.utils.add_fused_lm_head, transformers >= 5.6):
# enabled where the text config has `output_router_logits` and the coefficient (DPOConfig's router_aux_loss_coef,
# else the config's own, else 0.0) is non-zero; the backbone runs with output_router_logits=True and the loss is
# Mixtral's load_balancing_loss_func(router_logits, text_config.num_experts, text_config.num_experts_per_tok,
# attention_mask), for every MoE family alike.

def router_aux_loss_coef(lm, coef: Optional[float] = None) -> float:
    """The coefficient of ``lm``'s load-balancing loss (0.0: off) for a requested ``coef`` (None: the config's own).
    A non-zero ``coef`` for a model that returns no router logits raises, as TRL does."""
    text_config = lm.config.get_text_config()
    moe = hasattr(text_config, "output_router_logits")
    if coef is None:
        coef = getattr(text_config, "router_aux_loss_coef", 0.0) or 0.0
    elif coef and not moe:
        raise ValueError(f"router_aux_loss_coef is set to {coef} but {type(lm).__name__} is not a Mixture-of-Experts "
                         "model that returns its router logits, so there is no auxiliary loss to weight")
    if not moe or not coef:
        return 0.0
    missing = [a for a in ("num_experts", "num_experts_per_tok") if getattr(text_config, a, None) is None]
    if missing:
        raise ValueError(f"router_aux_loss_coef={coef}: {type(lm).__name__}'s config has no {' or '.join(missing)}, "
                         "which TRL's load-balancing loss reads (TRL fails there too). Set router_aux_loss_coef=0.0")
    return float(coef)


def router_experts(lm) -> tuple:
    """(num_experts, num_experts_per_tok) of the load-balancing loss (see router_aux_loss_coef)."""
    text_config = lm.config.get_text_config()
    return text_config.num_experts, text_config.num_experts_per_tok


# Classes whose backbone the long-context layouts (fastdpo.layout) are tested with: attention layers only, rotary
# positions from position_ids, masks taken as given (tests/test_layout.py).
LAYOUT_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
                  "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
                  "GraniteForCausalLM")


def supports_layout(lm) -> bool:
    return type(lm).__name__ in LAYOUT_CLASSES and type(lm).__module__.startswith("transformers.models.")


def check_layout_support(lm) -> None:
    if not supports_layout(lm):
        raise ValueError(f"the shared-prompt and packed layouts are not verified for {type(lm).__name__} (its "
                         "positions, masks or recurrent layers may not follow them); verified: "
                         f"{', '.join(LAYOUT_CLASSES)}. Use the plain layout (--no-share-prompt --no-packing)")
