"""fastdpo in a plain PyTorch loop: ``fastdpo.model_dpo_loss`` runs a Hugging Face causal LM's backbone and
hands its output head (bias, logit scaling, softcap, tied weights and LoRA included) to the fused DPO loss, so
the logits never exist. Runs on CPU in seconds with a tiny randomly initialized Llama (no downloads).

    python examples/plain_loop.py
"""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from fastdpo import model_dpo_loss, model_sequence_logps


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config)


def toy_batch(pairs=4, prompt=6, completion=10, vocab=128, seed=0):
    """input_ids [2P, L] (P chosen rows, then P rejected) and labels as in Hugging Face (-100: not scored)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (pairs, prompt), generator=g)
    chosen = torch.randint(0, vocab // 2, (pairs, completion), generator=g)           # "good" tokens
    rejected = torch.randint(vocab // 2, vocab, (pairs, completion), generator=g)     # "bad" tokens
    input_ids = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])
    labels = input_ids.clone()
    labels[:, :prompt] = -100                     # prompt tokens are not scored
    return input_ids, labels                      # shifted inside, as in Hugging Face


def logps_of(model, input_ids, labels):
    return model_sequence_logps(model, input_ids, labels)


def main(steps=20, beta=0.1):
    model = tiny_model()
    input_ids, labels = toy_batch()
    with torch.no_grad():                         # the reference: the initial model, computed once
        ref_chosen, ref_rejected = logps_of(model, input_ids, labels).chunk(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        loss, metrics = model_dpo_loss(model, input_ids, labels, ref_chosen, ref_rejected, beta=beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  reward accuracy {metrics['rewards/accuracies'].item():.2f}"
                  f"  margin {metrics['rewards/margins'].item():.3f}")
    return loss.item(), metrics


if __name__ == "__main__":
    main()
