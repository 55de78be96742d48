"""What each Hugging Face causal-LM family's forward does around its output head: the one place that knows.

Each entry was read off the family's ``forward`` in transformers (``logits = self.lm_head(hidden_states)`` and the
lines after it) and is tested against the plain path (``tests/test_models.py``). A family's forward may scale the
logits, divide them, or softcap them; the values come from the attributes that forward reads, at call time.
A class that is not in the table (another family, remote code) raises: its forward may do something else.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import reduce
from typing import Optional


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
SOFTCAP = HeadRule(softcap="config.final_logit_softcapping")

# causal-LM class name -> rule. Plain: logits = lm_head(self.<backbone>(...).last_hidden_state).
HEADS = {
    "LlamaForCausalLM": PLAIN,
    "MistralForCausalLM": PLAIN,
    "MixtralForCausalLM": PLAIN,
    "Qwen2ForCausalLM": PLAIN,
    "Qwen3ForCausalLM": PLAIN,
    "PhiForCausalLM": PLAIN,
    "Phi3ForCausalLM": PLAIN,
    "GemmaForCausalLM": PLAIN,
    "Gemma2ForCausalLM": SOFTCAP,
    "Gemma3ForCausalLM": SOFTCAP,
    "CohereForCausalLM": HeadRule(multiply=("logit_scale",)),
    "GraniteForCausalLM": HeadRule(divide=("config.logits_scaling",)),
    "GraniteMoeForCausalLM": HeadRule(divide=("config.logits_scaling",)),
    "FalconH1ForCausalLM": HeadRule(multiply=("model.lm_head_multiplier",)),
    "GPT2LMHeadModel": HeadRule(backbone="transformer"),
}


def head_rule(lm) -> HeadRule:
    """The rule of ``lm``'s class, which must be transformers' own class of that name."""
    cls = type(lm)
    rule = HEADS.get(cls.__name__)
    if rule is None or not cls.__module__.startswith("transformers.models."):
        origin = "remote code" if not cls.__module__.startswith("transformers.") else "transformers"
        raise ValueError(
            f"fastdpo does not know the output head of {cls.__name__} ({origin}, module {cls.__module__}): its "
            "forward may scale, cap or otherwise change the logits, and a fused head that missed it would give "
            "wrong log-probs. Known classes are listed in fastdpo.heads.HEADS; a family whose forward is "
            "`logits = lm_head(backbone(...))` (or scales/caps it) can be added there with a test.")
    return rule
