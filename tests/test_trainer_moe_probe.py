"""fastdpo train with an MoE model (the router's load-balancing loss, --router-aux-loss-coef as TRL's) and with a
remote-code model class the head table does not know (the probe)."""
import json
import os

import pytest
import torch

from fastdpo.train import trainer

from remote_code import remote_llama
from test_trainer import config

pytest.importorskip("datasets")


def tiny_moe_dir(tmp_path, family="qwen3_moe") -> str:
    """A tiny random MoE (4 experts, 2 per token; config coefficient 0.001) and a WordLevel tokenizer."""
    from test_trl_parity import make_moe, make_tokenizer
    path = tmp_path / family
    make_moe(family, seed=0).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def word_pairs(tmp_path) -> str:
    """20 preference pairs in the tokenizer's words (w0..w59): the trainer's passes stay a few micro-batches."""
    from test_trl_parity import make_dataset
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in make_dataset(pairs=20)))
    return str(path)


def run_config(tmp_path, name, model, **kw):
    return config(tmp_path, name, model=model, dataset=word_pairs(tmp_path), steps=1, eval_every=0, save_every=0,
                  batch_size=4, **kw)


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_moe_model_adds_the_load_balancing_loss_and_logs_it(tmp_path):
    """Default --router-aux-loss-coef: the config's 0.001 times the router's aux_loss is added to the DPO loss
    (step 1: the same weights, batch and layout with the coefficient 0 differ by exactly that) and logged as
    aux_loss and eval_aux_loss; the plain layout is chosen for it."""
    model = tiny_moe_dir(tmp_path, "mixtral")        # a class the shared/packed layouts support: not chosen here
    runs, coefs = {}, {}
    for name, options in (("default", {}), ("off", dict(router_aux_loss_coef=0.0, share_prompt=False, packing=False))):
        cfg = run_config(tmp_path, name, model, **options)
        trainer.train(cfg)
        assert cfg.share_prompt is False and cfg.packing is False
        runs[name], coefs[name] = records(cfg.output_dir), cfg.router_aux_loss_coef
    assert coefs == {"default": 0.001, "off": 0.0}
    step = next(r for r in runs["default"] if "loss" in r)
    assert step["aux_loss"] > 0.5
    assert any("eval_aux_loss" in r for r in runs["default"])
    assert not any("aux_loss" in r or "eval_aux_loss" in r for r in runs["off"])
    plain = next(r for r in runs["off"] if "loss" in r)["loss"]
    assert step["loss"] - plain == pytest.approx(0.001 * step["aux_loss"], rel=1e-4)


def test_moe_with_a_shared_prompt_layout_or_a_dense_model_says_why(tmp_path):
    with pytest.raises(ValueError, match="--share-prompt: the MoE load-balancing loss"):
        trainer.train(run_config(tmp_path, "shared", tiny_moe_dir(tmp_path, "mixtral"), share_prompt=True))
    with pytest.raises(ValueError, match="--router-aux-loss-coef: .* is not a Mixture-of-Experts model"):
        trainer.train(run_config(tmp_path, "dense", None, router_aux_loss_coef=0.01))


@pytest.mark.parametrize("factor", [1.0, 1.5], ids=["plain-forward", "scaled-logits"])
def test_remote_code_model_is_probed(factor, tmp_path):
    """--trust-remote-code with a class the head table does not know: probed; a plain head trains (one-line
    notice), a forward that scales its logits is refused."""
    from test_trl_parity import make_model, make_tokenizer
    path = remote_llama(tmp_path / "remote", make_model(seed=0), make_tokenizer(), logit_factor=factor)
    cfg = run_config(tmp_path, "run", path, trust_remote_code=True)
    if factor != 1.0:
        with pytest.raises(ValueError, match="RemoteLlamaForCausalLM .* log-probs differ"):
            trainer.train(cfg)
        return
    with pytest.warns(UserWarning, match="RemoteLlamaForCausalLM .* is not in fastdpo.heads.HEADS; accepted"):
        trainer.train(cfg)
    assert [r["step"] for r in records(cfg.output_dir) if "loss" in r] == [1]
