"""fastdpo in a plain PyTorch loop: a Hugging Face causal LM's backbone gives hidden states,
``linear_dpo_loss`` turns them and the lm_head weight into the DPO loss. Runs on CPU in seconds
with a tiny randomly initialized Llama (no downloads).

    python examples/plain_loop.py
"""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from fastdpo import sequence_logps
from fastdpo.loss import linear_dpo_loss


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config)


def toy_batch(pairs=4, prompt=6, completion=10, vocab=128, seed=0):
    """input_ids [2P, L] (P chosen rows, then P rejected) and labels aligned for next-token scoring."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (pairs, prompt), generator=g)
    chosen = torch.randint(0, vocab // 2, (pairs, completion), generator=g)           # "good" tokens
    rejected = torch.randint(vocab // 2, vocab, (pairs, completion), generator=g)     # "bad" tokens
    input_ids = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])
    labels = input_ids.clone()
    labels[:, :prompt] = -100                     # prompt tokens are not scored
    return input_ids, labels[:, 1:]               # hidden[:, t] predicts token t + 1


def logps_of(model, input_ids, labels):
    hidden = model.model(input_ids).last_hidden_state[:, :-1]
    return sequence_logps(hidden, model.lm_head.weight, labels)


def main(steps=20, beta=0.1):
    model = tiny_model()
    input_ids, labels = toy_batch()
    with torch.no_grad():                         # the reference: the initial model, computed once
        ref_chosen, ref_rejected = logps_of(model, input_ids, labels).chunk(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        hidden = model.model(input_ids).last_hidden_state[:, :-1]                   # [2P, L-1, D]
        loss, metrics = linear_dpo_loss(hidden, model.lm_head.weight, labels, ref_chosen, ref_rejected, beta=beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  reward accuracy {metrics['rewards/accuracies'].item():.2f}"
                  f"  margin {metrics['rewards/margins'].item():.3f}")
    return loss.item(), metrics


if __name__ == "__main__":
    main()
