"""Tiny Hugging Face models of several families, and a batch for them (shared by the model and trainer tests)."""
import torch
import transformers

V, D = 97, 32
COMMON = dict(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# id -> (config class, options). Softcaps and scales are far from 1 and the head weights are enlarged (HEAD_GAIN)
# so that a missed transform moves the log-probs by much more than the tolerance.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2-tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=8)),
    "gemma-scaled-embeddings": ("GemmaConfig", dict(head_dim=8)),
    "gemma2-softcap": ("Gemma2Config", dict(head_dim=8, final_logit_softcapping=2.0, sliding_window=4)),
    "gemma3-softcap": ("Gemma3TextConfig", dict(head_dim=8, final_logit_softcapping=2.0, sliding_window=4)),
    "phi-bias": ("PhiConfig", dict(resid_pdrop=0.0, embd_pdrop=0.0)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=4)),
    "granite-scaling": ("GraniteConfig", dict(logits_scaling=4.0)),
    "granitemoe-scaling": ("GraniteMoeConfig", dict(logits_scaling=3.0, num_local_experts=4,
                                                     num_experts_per_tok=2)),
    "cohere-logit-scale": ("CohereConfig", dict(logit_scale=0.5)),
    "mistral-sliding-window": ("MistralConfig", dict(sliding_window=4)),
    "mixtral-moe": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "gpt2-tied": ("GPT2Config", dict(n_embd=D, n_layer=2, n_head=4, n_positions=64, vocab_size=V)),
    "opt-decoder": ("OPTConfig", dict(ffn_dim=48, word_embed_proj_dim=D, dropout=0.0)),
    "gpt-neox": ("GPTNeoXConfig", {}),
    "falcon-h1-multiplier": ("FalconH1Config", dict(lm_head_multiplier=0.3, mamba_d_ssm=32, mamba_n_heads=4,
                                                    mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8,
                                                    mamba_chunk_size=8)),
    "mamba": ("MambaConfig", dict(state_size=4)),
}
NO_COMMON = ("GPT2Config",)
HEAD_GAIN = 8.0


def tiny(family: str, seed: int = 0, vocab: int = None):
    cls, options = FAMILIES[family]
    config_cls = getattr(transformers, cls)
    options = options if cls in NO_COMMON else {**COMMON, **options}
    if vocab is not None:
        options = {**options, "vocab_size": vocab}
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**options)).float().eval()
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(HEAD_GAIN)
        if head.bias is not None:
            head.bias.normal_(0, 2.0)           # HF initializes it to zero: make it matter
    return model


def batch(B=3, L=11, seed=1):
    """Right-padded rows with a prompt part: input_ids, labels (HF style), attention_mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L - 3:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return ids, labels, mask
