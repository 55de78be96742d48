"""A remote-code model for the tests: a Llama subclass in a modeling file beside its config (auto_map), loaded with
trust_remote_code=True; a class fastdpo's head table does not know."""
import json

REMOTE_CONFIG = """from transformers import LlamaConfig


class RemoteLlamaConfig(LlamaConfig):
    model_type = "remote_llama"
"""
REMOTE_MODELING = """from transformers import LlamaForCausalLM

from .configuration_remote_llama import RemoteLlamaConfig


class RemoteLlamaForCausalLM(LlamaForCausalLM):
    config_class = RemoteLlamaConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if getattr(self.config, "logit_factor", 1.0) != 1.0:     # what a fused head would miss
            out.logits = out.logits * self.config.logit_factor
        return out
"""


def remote_llama(directory, model, tokenizer, logit_factor=1.0) -> str:
    """A LlamaForCausalLM saved as a remote-code model (auto_map to a Llama subclass written beside it, whose
    forward multiplies the logits by ``logit_factor``) with its tokenizer; its path."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "configuration_remote_llama.py").write_text(REMOTE_CONFIG)
    (directory / "modeling_remote_llama.py").write_text(REMOTE_MODELING)
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type="remote_llama", architectures=["RemoteLlamaForCausalLM"], logit_factor=logit_factor,
                  auto_map={"AutoConfig": "configuration_remote_llama.RemoteLlamaConfig",
                            "AutoModelForCausalLM": "modeling_remote_llama.RemoteLlamaForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)
