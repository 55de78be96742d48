"""TRL's DPOTrainer with fastdpo's fused log-probs and loss: the one-line swap.

    python examples/trl_dpo.py

    - from trl import DPOTrainer
    + from fastdpo.integrations.trl import FastDPOTrainer      # and DPOTrainer(...) -> FastDPOTrainer(...)

Everything else is TRL as usual (DPOConfig, a preference dataset, the model by name or path as TRL's docs give it,
PEFT, accelerate). Here a tiny randomly initialized Llama and a word-level tokenizer, saved to a temporary directory
(no downloads) and passed by path, learn on CPU in seconds to prefer replies made of "good" words; the reference
log-probs are precomputed from the initial policy.
"""
import random
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig

from fastdpo.integrations.trl import FastDPOTrainer

WORDS = 60


def tiny_tokenizer():
    """One whitespace-separated word w0..w59 = one token, plus <pad> and </s> (eos)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def preference_data(pairs=16, seed=0):
    """Prompts of random words; chosen replies from the first half of the words, rejected from the second."""
    rng = random.Random(seed)
    words = lambda lo, hi, n: " ".join(f"w{rng.randrange(lo, hi)}" for _ in range(n))  # noqa: E731
    return Dataset.from_list([{"prompt": words(0, WORDS, 4), "chosen": " " + words(0, WORDS // 2, 5),
                               "rejected": " " + words(WORDS // 2, WORDS, 5)} for _ in range(pairs)])


def main(steps=20):
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-2,
                         beta=0.1, precompute_ref_log_probs=True, logging_steps=1, save_strategy="no",
                         report_to=[], use_cpu=True, disable_tqdm=True)
        tiny_model().save_pretrained(f"{out}/tiny-llama")            # stands in for a hub name such as
        tiny_tokenizer().save_pretrained(f"{out}/tiny-llama")        # "Qwen/Qwen2-0.5B-Instruct"
        trainer = FastDPOTrainer(model=f"{out}/tiny-llama", args=args, train_dataset=preference_data())
        trainer.train()
    final = [h for h in trainer.state.log_history if "loss" in h][-1]
    print(f"step {final['step']}: loss {final['loss']:.4f}, reward accuracy {final['rewards/accuracies']:.2f}, "
          f"margin {final['rewards/margins']:.3f}")
    return final["loss"]


if __name__ == "__main__":
    main()
