"""The thin trainer: default run (shortened), cached reference, exact resume, bad input, CLI."""
import json
import math
import os

import pytest
import torch

from fastdpo.train import cli, prefs, ref_cache, runs, trainer
from fastdpo.train.reporting import Reporter
from fastdpo.train.config import TrainConfig, build

pytest.importorskip("datasets")


def small_bundled(tmp_path) -> str:
    """96 train and 24 eval rows of the bundled data: the trainer tests' default, to keep them fast."""
    path = tmp_path / "small.jsonl"
    if not path.exists():
        with open(prefs.bundled_path()) as f:
            rows = [json.loads(line) for line in f]
        rows = [r for r in rows if r["split"] == "train"][:96] + [r for r in rows if r["split"] == "eval"][:24]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(tmp_path, name="run", **kw):
    """A checked config, as the CLI builds it (defaults that depend on --model applied); the small data unless
    ``dataset`` is given (None: the whole bundled data)."""
    base = dict(steps=6, batch_size=8, eval_every=3, save_every=3, warmup_steps=2, output_dir=str(tmp_path / name),
                cache_dir=str(tmp_path / "cache"), progress=False, dataset=small_bundled(tmp_path))
    options = {k: v for k, v in {**base, **kw}.items() if v is not None}
    return build(options, set(options))


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def test_default_run_shortened_learns_and_writes_the_run_directory(tmp_path):
    cfg = config(tmp_path, steps=30, batch_size=16, eval_every=15, save_every=0, warmup_steps=5, dataset=None)
    summary = trainer.train(cfg)
    assert summary["after"]["eval_rewards/accuracies"] >= 0.9
    assert summary["after"]["eval_rewards/margins"] > summary["before"]["eval_rewards/margins"]
    out = cfg.output_dir
    for name in ("metrics.jsonl", "training.png", "config.json", "summary.json", "model/config.json",
                 "model/tokenizer.json"):
        assert os.path.exists(os.path.join(out, name)), name
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(os.path.join(out, "model")).config.vocab_size > 0


def test_cached_reference_gives_the_losses_of_a_per_step_reference(tmp_path, monkeypatch):
    """The cache holds what a frozen reference model computes at every step: bitwise the same losses, because the
    reference pass runs the training pass's function on the training pass's micro-batches."""
    cached = config(tmp_path, "cached")
    trainer.train(cached)
    made = []
    original = trainer.reference_logps

    def per_step(split, policy, examples, pad_id, digest, settings, cfg, dist, amp):
        if split != "train":
            return original(split, policy, examples, pad_id, digest, settings, cfg, dist, amp)
        made.append(trainer.PerStepReference(policy, examples, pad_id, cfg, dist.device, amp))
        return made[0]

    monkeypatch.setattr(trainer, "reference_logps", per_step)
    trainer.train(config(tmp_path, "per-step"))
    assert made[0].calls == 6
    assert losses(cached.output_dir) == losses(str(tmp_path / "per-step"))


def test_first_step_margins_are_exactly_zero(tmp_path):
    """Policy == reference at step 1: the same arithmetic in both passes, so no rounding noise in the metrics."""
    cfg = config(tmp_path, steps=1, eval_every=0, save_every=0, grad_accum=2)
    trainer.train(cfg)
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        before, step1 = [json.loads(line) for line in f][:2]
    assert before["step"] == 0 and before["eval_rewards/accuracies"] == before["eval_rewards/margins"] == 0.0
    assert before["eval_rewards/chosen"] == before["eval_rewards/rejected"] == 0.0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert step1[key] == 0.0, key
    assert step1["loss"] == pytest.approx(0.6931471805599453, rel=1e-6)


def test_resume_continues_with_the_losses_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """Killed after step 5 (the last checkpoint is checkpoint-3): --resume gives the uninterrupted run's losses,
    metrics.jsonl is rewritten from the checkpoint's log history, and nothing is unpickled."""
    trainer.train(config(tmp_path, "straight"))
    interrupted = config(tmp_path, "interrupted", save_total_limit=1)
    real_train = Reporter.train

    def log_then_die(self, record, last):
        real_train(self, record, last)
        if record["step"] == 5:
            raise KeyboardInterrupt
    monkeypatch.setattr(Reporter, "train", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(interrupted)
    monkeypatch.setattr(Reporter, "train", real_train)
    assert [os.path.basename(p) for _, p in runs.checkpoints(interrupted.output_dir)] == ["checkpoint-3"]
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: real_load(*a, **{**kw, "weights_only": True}))
    trainer.train(config(tmp_path, "interrupted", resume=True))
    assert losses(str(tmp_path / "straight")) == losses(interrupted.output_dir)
    assert [s for s, _ in losses(interrupted.output_dir)] == [1, 2, 3, 4, 5, 6]
    with open(os.path.join(interrupted.output_dir, "checkpoint-6", "trainer_state.json")) as f:
        state = json.load(f)
    assert state["global_step"] == 6 and [r["step"] for r in state["log_history"] if "loss" in r] == list(range(1, 7))
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", "config.json"):
        assert os.path.exists(os.path.join(interrupted.output_dir, "checkpoint-6", name)), name


def test_resume_of_a_run_written_before_an_option_existed(tmp_path):
    """A saved config.json without a newer option's key (--ld-alpha, --use-weighting) counts as its default."""
    first = config(tmp_path, steps=2, eval_every=0, save_every=0)
    trainer.train(first)
    path = os.path.join(first.output_dir, "config.json")
    with open(path) as f:
        saved = json.load(f)
    del saved["ld_alpha"], saved["use_weighting"]
    with open(path, "w") as f:
        json.dump(saved, f)
    trainer.train(config(tmp_path, steps=3, eval_every=0, save_every=0, resume=True))
    assert [s for s, _ in losses(first.output_dir)] == [1, 2, 3]
    with pytest.raises(ValueError, match="use_weighting False then, True now"):
        trainer.train(config(tmp_path, steps=4, eval_every=0, save_every=0, resume=True, use_weighting=True))


def test_old_checkpoint_format_gets_a_clear_message(tmp_path):
    out = tmp_path / "old"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "state.pt").write_bytes(b"pickle")
    (out / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="checkpoint of fastdpo 0.1 .* no longer loaded"):
        trainer.train(config(tmp_path, "old", resume=True))


def test_corrupt_or_foreign_cache_is_recomputed(tmp_path):
    cfg = config(tmp_path, steps=1, eval_every=0, save_every=0)
    trainer.train(cfg)
    files = [f for f in os.listdir(cfg.cache_dir) if f.startswith("ref-logps-")]
    assert len(files) == 2                          # train and eval splits
    path = os.path.join(cfg.cache_dir, files[0])
    blob = torch.load(path, weights_only=True)
    with open(path, "wb") as f:                     # a partial, unreadable file
        f.write(b"\x00" * 100)
    assert ref_cache.load(cfg.cache_dir, blob["key"], blob["logps"].shape[0]) is None
    ref_cache.save(cfg.cache_dir, blob["key"], blob["logps"])
    assert torch.equal(ref_cache.load(cfg.cache_dir, blob["key"], blob["logps"].shape[0]), blob["logps"])
    assert ref_cache.load(cfg.cache_dir, blob["key"], blob["logps"].shape[0] + 1) is None     # wrong count
    tampered = dict(blob, logps=blob["logps"] + 1)                                             # bad checksum
    torch.save(tampered, path)
    assert ref_cache.load(cfg.cache_dir, blob["key"], blob["logps"].shape[0]) is None


def test_resume_from_a_different_config_is_refused(tmp_path):
    trainer.train(config(tmp_path, steps=3, eval_every=0))
    with pytest.raises(ValueError, match=r"different config \(beta differ: beta 0.1 then, 0.5 now\)"):
        trainer.train(config(tmp_path, steps=3, eval_every=0, beta=0.5, resume=True))


def test_prompts_longer_than_max_length_are_dropped_and_counted(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "word " * 200, "chosen": "yes", "rejected": "no"}] + \
           [{"prompt": "short question", "chosen": "a kind and specific answer", "rejected": "no"}] * 20
    data.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(UserWarning, match="dropped 1 of"):
        trainer.train(config(tmp_path, dataset=str(data), steps=1, eval_every=0, save_every=0, max_length=32))


def cached_reference_tensors(cache_dir):
    return sorted((torch.load(os.path.join(cache_dir, f), weights_only=True)["logps"]
                   for f in os.listdir(cache_dir) if f.startswith("ref-logps-")), key=len)


def test_model_by_hub_name_resolves_offline_from_the_hub_cache(tmp_path, capsys):
    """--model takes a hub name (org/name): here a snapshot in a local Hugging Face cache, offline (a subprocess:
    HF_HOME is read at import). An unknown name fails with the one-line error (in this process, offline too)."""
    import shutil
    import subprocess
    import sys
    trainer.train(config(tmp_path, "base", steps=1, eval_every=0, save_every=0))
    repo, revision = tmp_path / "hf" / "hub" / "models--fake-org--tiny-llama", "0" * 40
    shutil.copytree(tmp_path / "base" / "model", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def args(model, out):
        return ["train", "--model", model, "--steps", "2", "--dataset", small_bundled(tmp_path), "--eval-every", "0",
                "--save-every", "0", "--output-dir", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache"),
                "--no-progress"]
    run = subprocess.run([sys.executable, "-m", "fastdpo", *args("fake-org/tiny-llama", "hub")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [s for s, _ in losses(str(tmp_path / "hub"))] == [1, 2]
    capsys.readouterr()
    assert cli.main(args("fake-org/no-such-model", "missing")) != 0
    assert "--model 'fake-org/no-such-model': cannot load it" in capsys.readouterr().err


def test_lora_reference_is_the_base_model_and_only_adapters_train(tmp_path):
    pytest.importorskip("peft")
    trainer.train(config(tmp_path, "plain", steps=1, eval_every=0, save_every=0))
    plain_refs = cached_reference_tensors(str(tmp_path / "cache"))
    lora_cache = str(tmp_path / "lora-cache")
    cfg = config(tmp_path, "lora", steps=3, eval_every=0, save_every=0, lora_r=4, report_to="tensorboard",
                 cache_dir=lora_cache)
    trainer.train(cfg)
    for a, b in zip(plain_refs, cached_reference_tensors(lora_cache)):   # adapters disabled == base model
        assert torch.equal(a, b)
    assert os.path.exists(os.path.join(cfg.output_dir, "model", "adapter_model.safetensors"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(cfg.output_dir, "tensorboard")))


def test_conversational_data_masks_the_templated_prompt(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"where is order {i}?"}],
             "chosen": [{"role": "assistant", "content": f"Order {i} ships today; here is the tracking link."}],
             "rejected": [{"role": "assistant", "content": "No idea."}]} for i in range(24)]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = config(tmp_path, dataset=str(data), steps=2, eval_every=0, save_every=0)
    summary = trainer.train(cfg)
    assert summary["train_examples"] + summary["eval_examples"] == 24
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(cfg.output_dir, "model"))
    [example] = prefs.tokenize(rows[:1], tok, 96, "check")
    _, _, labels = prefs.collate([example], tok.pad_token_id)
    scored = [t for t in labels[0].tolist() if t != -100]
    assert "ships today" in tok.decode(scored) and "where is order" not in tok.decode(scored)
    assert scored.count(tok.eos_token_id) == 1          # the template's end of turn; no second EOS


# ------------------------------------------------------------- data parallel and FSDP (2 CPU processes, gloo)

LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"],
    # accelerate's multi-process launcher (torch.distributed.run underneath; gloo when there is no GPU)
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"],
}


def torchrun(port, *args, script=("-m", "fastdpo"), launcher="torchrun"):
    """SCRIPT ARGS (`fastdpo ARGS` by default) in 2 CPU processes (gloo); a hang (a collective one rank never
    joins) fails the test."""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, *LAUNCHERS[launcher], str(port), *script, *map(str, args)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


FSDP_OPTIONS = dict(steps=4, batch_size=8, eval_every=0, save_every=2, warmup_steps=2, progress=False)
DDP_OPTIONS = dict(steps=4, batch_size=8, eval_every=0, save_every=0, warmup_steps=2, progress=False)
LORA_OPTIONS = dict(FSDP_OPTIONS, steps=3, save_every=0, lora_r=4, gradient_checkpointing=True)


def flags(**options):
    out = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        out += [flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
    return out


# Several `fastdpo train` runs one after the other in one launch (each process starts once: most of a run's time
# here); a run that fails is recorded and the next one still runs. The run named "interrupted" is killed at step 4
# on every rank (the reference pass and the evaluations, in eval mode, do not count): its last checkpoint is step 2.
RUNS = """
import json, os, sys, traceback
from fastdpo.train import cli, trainer
real = trainer.pair_loss

def dies_at_step_4():
    calls = []
    def pair_loss_or_die(policy, *args, **kwargs):
        if policy.training:
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("killed")
        return real(policy, *args, **kwargs)
    return pair_loss_or_die

done = {}
for name, argv in json.load(open(sys.argv[1])).items():
    trainer.pair_loss = dies_at_step_4() if name == "interrupted" else real
    try:
        done[name] = cli.main(argv)
    except Exception as e:
        traceback.print_exc()
        done[name] = f"{type(e).__name__}: {e}"
with open(sys.argv[2] + os.environ["RANK"], "w") as f:
    json.dump(done, f)
"""


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One torchrun launch, four runs: data parallel ("ddp": the small data); FSDP ("fsdp") and FSDP killed at step 4
    ("interrupted") of a model with tied embeddings on 201 train / 49 eval pairs (shards of 101/100 and 25/24 pairs:
    the eval shards take 4 and 3 batches of 8, so the reference pass must even out its forward calls); FSDP + LoRA
    + gradient checkpointing ("lora": the small data). -> (tmp dir, {run: (options, {rank: exit code or error})},
    the launch's stderr)"""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    from fastdpo.train.tokenizer import trained_tokenizer
    tmp = tmp_path_factory.mktemp("launched")
    with open(prefs.bundled_path()) as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if r["split"] == "train"][:201] + [r for r in rows if r["split"] == "eval"][:49]
    (tmp / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tokenizer = trained_tokenizer(rows, 1024, str(tmp / "tokenizer"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp / "tied"))
    tokenizer.save_pretrained(str(tmp / "tied"))
    tied = dict(FSDP_OPTIONS, model=str(tmp / "tied"), dataset=str(tmp / "data.jsonl"))
    options = {"ddp": dict(DDP_OPTIONS, dataset=small_bundled(tmp)), "fsdp": dict(tied, fsdp=True),
               "lora": dict(LORA_OPTIONS, fsdp=True, dataset=small_bundled(tmp)), "interrupted": dict(tied, fsdp=True)}
    caches = {"ddp": "cache-ddp", "fsdp": "cache-fsdp", "lora": "cache-lora", "interrupted": "cache-fsdp"}
    argv = {name: ["train", *flags(**o, output_dir=tmp / name, cache_dir=tmp / caches[name])]
            for name, o in options.items()}
    runs_ = launch_runs(29518, tmp, "first", argv)
    if (tmp / "interrupted" / "metrics.jsonl").exists():      # as the kill left it (a resume rewrites it)
        shutil.copy(tmp / "interrupted" / "metrics.jsonl", tmp / "killed-metrics.jsonl")
    return tmp, options, runs_


def launch_runs(port, tmp, launch, argv, launcher="torchrun"):
    """{run: argv} through RUNS in one launch. -> ({run: {rank: exit code or error}}, the launch's stderr)"""
    (tmp / f"{launch}.json").write_text(json.dumps(argv))
    (tmp / "runs.py").write_text(RUNS)
    run = torchrun(port, tmp / f"{launch}.json", tmp / f"{launch}-done-rank", script=[str(tmp / "runs.py")],
                   launcher=launcher)
    done = [json.loads((tmp / f"{launch}-done-rank{rank}").read_text()) for rank in range(2)]
    return {name: {rank: done[rank].get(name) for rank in range(2)} for name in argv}, run.stderr


@pytest.fixture(scope="module")
def launched_again(launched):
    """A second launch, by accelerate launch where it is installed: data parallel ("accelerate": the "ddp" run's
    options) and the "interrupted" run resumed ("resumed"). -> {run: {rank: exit code or error}}, stderr"""
    import importlib.util
    tmp, options, _ = launched
    argv = {"accelerate": ["train", *flags(**options["ddp"], output_dir=tmp / "accelerate",
                                           cache_dir=tmp / "cache-accelerate")],
            "resumed": ["train", *flags(**options["interrupted"], output_dir=tmp / "interrupted",
                                        cache_dir=tmp / "cache-fsdp"), "--resume"]}
    launcher = "accelerate" if importlib.util.find_spec("accelerate") else "torchrun"
    return launch_runs(29520, tmp, "again", argv, launcher=launcher)


def assert_ran(runs_, name, code=0):
    """The run ended with this exit code (or error) on both ranks."""
    codes, stderr = runs_
    assert codes[name] == {0: code, 1: code}, (codes[name], stderr[-3000:])


def launched_run(launched, name):
    """The run's options and output dir; it must have ended with exit code 0 on both ranks."""
    tmp, options, runs_ = launched
    assert_ran(runs_, name)
    return options[name], str(tmp / name)


def single_process(tmp_path, options, name="single"):
    """The same run in this process (the comparisons are not bitwise). -> its output dir"""
    out = str(tmp_path / name)
    trainer.train(build({**options, "output_dir": out, "cache_dir": str(tmp_path / f"cache-{name}")}, set(options)))
    return out


def assert_same_loss_curve(single, double, steps):
    a, b = losses(single), losses(double)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, steps + 1))
    # Not bitwise: two half-batch means averaged by an all-reduce (DDP) or the reduce-scatter (FSDP), each padded
    # to its own longest sequence.
    torch.testing.assert_close(torch.tensor([l for _, l in a]), torch.tensor([l for _, l in b]), rtol=1e-5, atol=0)


def test_two_process_run_gives_the_single_process_loss_curve(launched, tmp_path):
    """torchrun with 2 CPU processes, same global batch: the same losses as one process."""
    options, double = launched_run(launched, "ddp")
    assert_same_loss_curve(single_process(tmp_path, options), double, 4)


def test_accelerate_launch_gives_the_single_process_loss_curve(launched, launched_again, tmp_path):
    """accelerate launch with 2 CPU processes, same global batch: the same losses as one process."""
    pytest.importorskip("accelerate")
    assert_ran(launched_again, "accelerate")
    options = launched[1]["ddp"]
    assert_same_loss_curve(single_process(tmp_path, options), str(launched[0] / "accelerate"), 4)


def test_fsdp_two_process_run_gives_the_single_process_loss_curve_cache_and_model(launched, tmp_path):
    from transformers import AutoModelForCausalLM
    options, fsdp = launched_run(launched, "fsdp")
    single = single_process(tmp_path, {k: v for k, v in options.items() if k != "fsdp"})
    assert_same_loss_curve(single, fsdp, 4)
    # The reference cache: one file per split, no temporary left (the names differ: the number of processes is
    # part of the key, since each rank scores its half of every micro-batch); the rows gathered in data order,
    # fp32 rounding apart (observed 2e-7 relative): each half-batch is padded to its own longest sequence.
    cache_fsdp = launched[0] / "cache-fsdp"
    assert len(os.listdir(cache_fsdp)) == len(os.listdir(tmp_path / "cache-single")) == 2
    for x, y in zip(cached_reference_tensors(str(tmp_path / "cache-single")), cached_reference_tensors(cache_fsdp)):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=0)
    # The saved model: full-size weights, still tied, and the single-process run's logits. They differ by Adam's
    # response to fp32 rounding in the gradients (observed 1e-6 on logits of size 1.4); any one weight left at its
    # initial value (or a stale shard of it) moves them by 6e-4 (a layer norm) or more (0.3: the embeddings).
    ms, mf = (AutoModelForCausalLM.from_pretrained(os.path.join(d, "model")) for d in (single, fsdp))
    assert {k: v.shape for k, v in mf.state_dict().items()} == {k: v.shape for k, v in ms.state_dict().items()}
    assert mf.lm_head.weight is mf.model.embed_tokens.weight
    ids = torch.randint(0, ms.config.vocab_size, (4, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mf(ids).logits, ms(ids).logits, rtol=0, atol=1e-4)


def test_fsdp_resume_continues_with_the_losses_of_an_uninterrupted_run(launched, launched_again):
    """Killed at step 4 (the last checkpoint is step 2), resumed in a new launch: the losses of the uninterrupted
    FSDP run, bitwise."""
    tmp, _, runs_ = launched
    assert_ran(runs_, "interrupted", "RuntimeError: killed")
    with open(tmp / "killed-metrics.jsonl") as f:
        assert [r["step"] for r in map(json.loads, f) if "loss" in r] == [1, 2, 3]
    assert_ran(launched_again, "resumed")
    assert losses(str(tmp / "interrupted")) == losses(launched_run(launched, "fsdp")[1])


def test_fsdp_with_lora_gives_the_single_process_loss_curve(launched, tmp_path):
    """FSDP + LoRA + gradient checkpointing: the single-process curve (checkpointing on in both runs)."""
    pytest.importorskip("peft")
    options, fsdp = launched_run(launched, "lora")
    single = single_process(tmp_path, {k: v for k, v in options.items() if k != "fsdp"})
    assert_same_loss_curve(single, fsdp, 3)
    for x, y in zip(cached_reference_tensors(str(tmp_path / "cache-single")),     # the reference pass under FSDP + LoRA
                    cached_reference_tensors(str(launched[0] / "cache-lora"))):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=0)
    from safetensors.torch import load_file
    sa, sb = (load_file(os.path.join(d, "model", "adapter_model.safetensors")) for d in (single, fsdp))
    assert {k: v.shape for k, v in sb.items()} == {k: v.shape for k, v in sa.items()}


def test_fsdp_with_one_process_trains_unsharded_and_says_so(tmp_path):
    with pytest.warns(UserWarning, match="--fsdp with one process: nothing to shard"):
        trainer.train(config(tmp_path, fsdp=True, steps=1, eval_every=0, save_every=0))


# ------------------------------------------------------------------------------------ families with their own heads

@pytest.mark.parametrize("family", ["phi-bias", "granite-scaling"])
def test_trainer_first_step_gradients_equal_the_plain_paths(tmp_path, monkeypatch, family):
    """`fastdpo train --model` on Phi (lm_head bias) and Granite (logits / logits_scaling): the first step's
    gradients are those of the plain path (logits -> log_softmax -> DPO loss), and the bias trains."""
    from families import tiny
    from transformers import AutoModelForCausalLM

    from fastdpo import reference
    from fastdpo.train.tokenizer import trained_tokenizer
    train_pairs, _ = prefs.load_pairs(small_bundled(tmp_path), 0.1, 0)
    tok = trained_tokenizer(train_pairs, 300, str(tmp_path / "tok"))
    model_dir = str(tmp_path / "model")
    model = tiny(family, vocab=len(tok))
    model.config.update(dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id))
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    seen = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip_and_record(params, *args, **kwargs):
        params = list(params)
        if not seen:
            seen.extend(p.grad.clone() for p in params)
        return real_clip(params, *args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_record)
    cfg = config(tmp_path, model=model_dir, steps=2, batch_size=4, eval_every=0, save_every=0, warmup_steps=0,
                 lr=1e-2, max_length=64)
    trainer.train(cfg)

    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    examples = prefs.tokenize(train_pairs, tok, 64, "train")
    idx = trainer.batch_indices(0, len(examples), 4, cfg.seed)
    ids, mask, labels = prefs.collate([examples[i] for i in idx], tok.pad_token_id)
    with torch.no_grad():
        ref = reference.model_sequence_logps(plain, ids, labels, attention_mask=mask)
    logps = reference.model_sequence_logps(plain, ids, labels, attention_mask=mask)
    loss, _ = reference.dpo_loss(*logps.chunk(2), *ref.chunk(2), beta=cfg.beta)
    loss.backward()
    expected = [p.grad for p in plain.parameters()]
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    trained = AutoModelForCausalLM.from_pretrained(os.path.join(cfg.output_dir, "model"))
    head, start = trained.get_output_embeddings(), plain.get_output_embeddings()
    if head.bias is not None:
        assert (head.bias - start.bias).abs().max() > 1e-4           # the lm_head bias trains
    assert (head.weight - start.weight).abs().max() > 1e-4


def test_a_config_change_alone_invalidates_the_reference_cache(tmp_path):
    """Only config.json changes (rope_theta): the cached reference log-probs of the old config are not reused, so
    step 1 is again policy == reference (loss ln 2, margins 0)."""
    base = config(tmp_path, "base", steps=1, eval_every=0, save_every=0)
    trainer.train(base)
    model_dir = os.path.join(base.output_dir, "model")
    kw = dict(model=model_dir, steps=1, eval_every=0, save_every=0, max_length=96, lr=1e-3)
    trainer.train(config(tmp_path, "first", **kw))
    files = set(os.listdir(tmp_path / "cache"))
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["rope_theta"] = cfg.get("rope_theta", 10000.0) * 3 if "rope_theta" in cfg else 30000.0
    cfg.setdefault("rope_parameters", {})["rope_theta"] = cfg["rope_theta"]
    with open(path, "w") as f:
        json.dump(cfg, f)
    trainer.train(config(tmp_path, "second", **kw))
    assert len(set(os.listdir(tmp_path / "cache")) - files) == 2          # train and eval recomputed
    with open(os.path.join(tmp_path, "second", "metrics.jsonl")) as f:
        step1 = [json.loads(line) for line in f][1]
    assert step1["rewards/margins"] == 0.0 and step1["loss"] == pytest.approx(0.6931471805599453, rel=1e-6)


def test_low_precision_compute_keeps_float32_master_weights(tmp_path):
    """--torch-dtype bfloat16 at lr 1e-6: the weights stay float32, so the small updates land (in bf16 weights
    almost all of them rounded away)."""
    cfg = config(tmp_path, steps=2, eval_every=0, save_every=0, warmup_steps=0, torch_dtype="bfloat16", lr=1e-6)
    trainer.train(cfg)
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(os.path.join(cfg.output_dir, "model"))
    from safetensors.torch import load_file
    state = load_file(os.path.join(cfg.output_dir, "checkpoint-2", "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in state.values())
    start = trainer.load_model(cfg, prefs.load_pairs(cfg.dataset, 0.1, 0)[0])[1]
    # every lm_head entry gets a gradient (through the softmax): with bf16 weights most of the updates vanish
    moved = (trained.lm_head.weight != start.lm_head.weight).float().mean().item()
    assert moved > 0.99


def test_shared_and_packed_layout_trains_as_the_plain_one(tmp_path):
    """--share-prompt --packing (the default for Llama; on the CPU with --span-attention) and --no-share-prompt
    --no-packing: the same losses and rewards, rounding apart (the backbone sees other row shapes)."""
    runs = {}
    for name, layout in (("plain", dict(share_prompt=False, packing=False)), ("shared", {}),
                         ("dense", dict(span_attention=False)), ("cache", dict(packing=False, prompt_cache=True))):
        cfg = config(tmp_path, name, steps=3, eval_every=0, save_every=0, **layout)
        trainer.train(cfg)
        with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
            runs[name] = [json.loads(line) for line in f if '"loss"' in line]
        with open(os.path.join(cfg.output_dir, "config.json")) as f:
            saved = json.load(f)
        assert (saved["share_prompt"], saved["packing"]) == ((False, False) if name == "plain" else
                                                              (True, name in ("shared", "dense"))), name
        assert saved["span_attention"] == (name in ("shared", "cache")), name      # the CPU default (sdpa)
    for name in ("shared", "dense", "cache"):
        assert runs[name][0]["rewards/margins"] == 0.0
        for a, b in zip(runs[name], runs["plain"]):
            for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (name, a["step"], key)


def test_layout_flags_on_a_model_without_layout_support(tmp_path):
    from families import tiny
    from fastdpo.train.tokenizer import trained_tokenizer
    train_pairs, _ = prefs.load_pairs(None, 0.1, 0)
    tok = trained_tokenizer(train_pairs, 300, str(tmp_path / "tok"))
    model_dir = str(tmp_path / "gpt2")
    model = tiny("gpt2-tied", vocab=len(tok))
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    kw = dict(model=model_dir, steps=1, eval_every=0, save_every=0, max_length=64, lr=1e-3)
    with pytest.raises(ValueError, match="--share-prompt: GPT2LMHeadModel is not among the classes verified"):
        trainer.train(config(tmp_path, "forced", share_prompt=True, **kw))
    cfg = config(tmp_path, "auto", **kw)
    trainer.train(cfg)                                      # auto: the plain layout
    assert (cfg.share_prompt, cfg.packing) == (False, False)


def test_max_tokens_builds_micro_batches_by_a_token_budget(tmp_path):
    cfg = config(tmp_path, steps=3, eval_every=0, save_every=0, max_tokens=400)
    trainer.train(cfg)
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    assert [s["step"] for s in steps] == [1, 2, 3]
    shared = config(tmp_path, "x", max_tokens=400, share_prompt=True)
    stream = trainer.MicroBatches([prefs.Example([1] * 10, [2] * 5, [3] * 5)] * 50, shared)   # 20 tokens a pair
    assert [len(stream(k)) for k in range(4)] == [20, 20, 10, 20]       # epochs are not crossed
    assert sorted(i for k in range(stream.first_epoch) for i in stream(k)) == list(range(50))
    plain = config(tmp_path, "y", max_tokens=400, share_prompt=False, packing=False)
    assert len(trainer.MicroBatches([prefs.Example([1] * 10, [2] * 5, [3] * 5)] * 50, plain)(0)) == 13
    with pytest.raises(ValueError, match="--max-tokens 400: a training pair has 420 tokens"):
        trainer.MicroBatches([prefs.Example([1] * 400, [2] * 10, [3] * 10)], shared)


def small_data(tmp_path, name="d.jsonl", n=24, offset=0):
    rows = [{"prompt": f"where is order {i}?", "chosen": f" Order {i} ships today.", "rejected": " No idea."}
            for i in range(offset, offset + n)]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def records(out, key):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def test_trl_named_options_and_metrics(tmp_path):
    """--loss-type list + --loss-weights + --label-smoothing, --eval-dataset, --logging-steps: TRL's metric names
    (learning_rate, grad_norm, epoch, num_tokens, eval_loss, eval_rewards/...)."""
    cfg = config(tmp_path, dataset=small_data(tmp_path), eval_dataset=small_data(tmp_path, "e.jsonl", 5, 100),
                 steps=4, batch_size=4, eval_every=2, save_every=0, logging_steps=2, warmup_steps=0,
                 loss_type="robust,sft", loss_weights="1,0.5", label_smoothing=0.1)
    summary = trainer.train(cfg)
    assert (summary["train_examples"], summary["eval_examples"]) == (24, 5)
    train = records(cfg.output_dir, "loss")
    assert [r["step"] for r in train] == [2, 4]                       # every 2 steps
    for key in ("epoch", "learning_rate", "grad_norm", "num_tokens", "rewards/margins", "logps/chosen"):
        assert key in train[0], key
    assert train[1]["num_tokens"] > train[0]["num_tokens"] > 0 and train[1]["epoch"] == pytest.approx(16 / 24)
    evals = records(cfg.output_dir, "eval_loss")
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert {"eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"} <= set(evals[0])


def test_ld_alpha_and_use_weighting(tmp_path):
    """--ld-alpha (LD-DPO) weights the reference's log-probs as the policy's (step-1 margins still exactly 0) and
    makes the longer reply's log-prob less negative; --use-weighting (WPO) scales each pair's ln 2 by its weight
    (about 0.9 here), in training and in evaluation."""
    data = small_data(tmp_path)                    # chosen replies are longer than rejected ones
    kw = dict(dataset=data, steps=1, batch_size=4, eval_every=0, save_every=0)
    runs_ = {name: config(tmp_path, name, **kw, **opts) for name, opts in (
        ("plain", {}), ("ld", dict(ld_alpha=0.5)), ("wpo", dict(use_weighting=True)))}
    first = {}
    for name, cfg in runs_.items():
        trainer.train(cfg)
        first[name] = records(cfg.output_dir, "loss")[0], records(cfg.output_dir, "eval_loss")[0]
    for name, (step1, before) in first.items():
        assert step1["rewards/margins"] == before["eval_rewards/margins"] == 0.0, name
    plain, ld, wpo = (first[n][0] for n in ("plain", "ld", "wpo"))
    assert ld["logps/chosen"] > plain["logps/chosen"] and ld["logps/rejected"] == plain["logps/rejected"]
    assert ld["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert wpo["logps/chosen"] == plain["logps/chosen"] and 0 < wpo["loss"] < 0.99 * math.log(2)
    assert 0 < first["wpo"][1]["eval_loss"] < 0.99 * math.log(2)


def test_reference_free_and_ref_model(tmp_path):
    from families import tiny
    from fastdpo.train.tokenizer import trained_tokenizer
    data = small_data(tmp_path)
    free = config(tmp_path, "free", dataset=data, steps=1, batch_size=4, eval_every=0, save_every=0,
                  reference_free=True)
    trainer.train(free)
    assert not os.path.exists(free.cache_dir) or not [f for f in os.listdir(free.cache_dir) if "ref-logps" in f]
    step1 = records(free.output_dir, "loss")[0]
    assert step1["rewards/chosen"] == pytest.approx(0.1 * step1["logps/chosen"], rel=1e-5)   # against log-prob 0
    pairs, _ = prefs.load_pairs(data, 0.1, 0)
    tok = trained_tokenizer(pairs, 300, str(tmp_path / "tok"))
    for seed, name in ((0, "policy"), (1, "ref")):
        m = tiny("llama", seed=seed, vocab=len(tok))
        m.save_pretrained(str(tmp_path / name))
        tok.save_pretrained(str(tmp_path / name))
    kw = dict(dataset=data, model=str(tmp_path / "policy"), steps=1, batch_size=4, eval_every=0, save_every=0,
              max_length=64, lr=1e-3)
    other = config(tmp_path, "other-ref", ref_model=str(tmp_path / "ref"), **kw)
    trainer.train(other)
    assert records(other.output_dir, "loss")[0]["rewards/margins"] != 0.0     # not the policy's own log-probs
    same = config(tmp_path, "self-ref", ref_model=str(tmp_path / "policy"), **kw)
    trainer.train(same)
    assert records(same.output_dir, "loss")[0]["rewards/margins"] == 0.0
