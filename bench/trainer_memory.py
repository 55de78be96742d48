"""Peak memory of `fastdpo train` with the cached reference (one model) against a per-step reference model.

    python bench/trainer_memory.py [--hidden 768 --layers 8]

Builds a Llama-architecture model from a config (no downloads), saves it, and trains it for a few steps on the
bundled data twice, each in a fresh process: as `fastdpo train` does (reference log-probs cached, no reference
model kept), and with a frozen copy of the initial model kept to compute the reference at every step (what the
cache replaces). Prints the peak resident memory (ru_maxrss) of each process.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile



def child(mode: str, model_dir: str, out: str) -> None:
    from fastdpo.train import trainer
    from fastdpo.train.config import build

    if mode == "per-step":
        original = trainer.reference_logps

        def per_step(split, policy, examples, pad_id, digest, settings, cfg, dist, amp):
            if split != "train":
                return original(split, policy, examples, pad_id, digest, settings, cfg, dist, amp)
            return trainer.PerStepReference(policy, examples, pad_id, cfg, dist.device, amp)
        trainer.reference_logps = per_step
    options = dict(model=model_dir, steps=5, batch_size=8, eval_every=0, save_every=0, output_dir=out,
                   cache_dir=os.path.join(out, "cache"), progress=False, max_length=96)
    trainer.train(build(options, set(options)))
    print(json.dumps({"mode": mode, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fastdpo.train import prefs
    from fastdpo.train.tokenizer import trained_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        train_pairs, _ = prefs.load_pairs(None, 0.1, 0)
        tok = trained_tokenizer(train_pairs, 1024, os.path.join(tmp, "tok"))
        config = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                             num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)
        model = AutoModelForCausalLM.from_config(config)
        n_params = sum(t.numel() for t in model.parameters())
        model.save_pretrained(os.path.join(tmp, "model"))
        tok.save_pretrained(os.path.join(tmp, "model"))
        print(f"model: {n_params / 1e6:.1f} M parameters ({n_params * 4 / 2**20:.0f} MB fp32)")
        for mode in ("cached", "per-step"):
            run = subprocess.run([sys.executable, __file__, "--child", mode, os.path.join(tmp, "model"),
                                  os.path.join(tmp, mode)], capture_output=True, text=True, check=True)
            print(run.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
