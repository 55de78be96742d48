"""`fastdpo train` as a user meets it: every bad option or bad data ends with exit code 2 and one line naming the
culprit, before anything heavy runs and without writing or losing anything; Ctrl-C and SIGTERM keep the work."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastdpo.train import cli, trainer
from fastdpo.train.config import build

pytest.importorskip("datasets")

ROWS = [{"prompt": f"where is order {i}?", "chosen": f" Order {i} ships today.", "rejected": " No idea."}
        for i in range(12)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(tmp_path, capsys, *args, out="run"):
    """cli.main in this process -> (exit code, stderr without warning lines)."""
    code = cli.main(["train", "--output-dir", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache"),
                     "--no-progress", *map(str, args)])
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and not line.startswith("fastdpo train: warning:") and "Warning" not in line]
    return code, err


def assert_fails(tmp_path, capsys, culprit, *args, out="run"):
    """Exit 2, one line naming the culprit, no traceback, no run directory left behind."""
    code, err = run(tmp_path, capsys, *args, out=out)
    assert code == cli.EXIT_ERROR, err
    assert len(err) == 1, err
    assert err[0].startswith("fastdpo train: error: ") and culprit in err[0], err[0]
    assert not os.path.isdir(tmp_path / out) or not os.listdir(tmp_path / out)
    return err[0]


BAD_FLAGS = [
    (["--steps", "0"], "--steps must be an integer >= 1, got '0'"),
    (["--steps", "-5"], "--steps must be an integer >= 1"),
    (["--steps", "3.7"], "--steps must be an integer"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--grad-accum", "0"], "--grad-accum must be an integer >= 1"),
    (["--eval-every", "-1"], "--eval-every must be an integer >= 0"),
    (["--save-every", "-2"], "--save-every must be an integer >= 0"),
    (["--warmup-steps", "-3"], "--warmup-steps must be an integer >= 0"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be a number >= 0"),
    (["--lora-r", "-4"], "--lora-r must be an integer >= 0"),
    (["--lora-r", "4", "--lora-dropout", "1"], "--lora-dropout must be a number >= 0 and < 1"),
    (["--lora-alpha", "8"], "--lora-alpha only apply with --lora-r > 0"),
    (["--eval-fraction", "1.5"], "--eval-fraction must be a number > 0 and < 1, got '1.5'"),
    (["--eval-fraction", "-0.5"], "--eval-fraction must be a number > 0 and < 1"),
    (["--lr", "0"], "--lr must be a number > 0"),
    (["--lr", "nan"], "--lr must be a number > 0"),
    (["--lr", "fast"], "--lr must be a number > 0, got 'fast'"),
    (["--beta", "0"], "--beta must be a number > 0"),
    (["--max-length", "1"], "--max-length must be an integer >= 2"),
    (["--max-tokens", "0"], "--max-tokens must be an integer >= 2"),
    (["--prompt-cache", "--packing"], "--prompt-cache needs --no-packing"),
    (["--prompt-cache", "--no-share-prompt"], "--prompt-cache shares the prompt: it needs --share-prompt"),
    (["--span-attention", "--attn-implementation", "eager"],
     "--span-attention: it runs sdpa span by span; LlamaForCausalLM runs 'eager'; use --no-span-attention"),
    (["--span-attention", "--gradient-checkpointing"], "--span-attention: gradient checkpointing's recompute"),
    (["--span-attention", "--no-share-prompt", "--no-packing"],
     "--span-attention: it applies to --share-prompt/--packing"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--schedule", "exponential"], "--schedule must be one of cosine, linear, constant"),
    (["--torch-dtype", "float8"], "--torch-dtype must be one of auto, float32, bfloat16, float16"),
    (["--loss-type", "nope"], "--loss-type must be one of sigmoid, hinge, ipo,"),
    (["--loss-type", "sigmoid,nope"], "or several of them comma-separated, got 'sigmoid,nope'"),
    (["--loss-type", "exo_pair"], "--loss-type 'exo_pair': label_smoothing must lie in (0, 1)"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--loss-weights", "a,b"], "--loss-weights must be comma-separated numbers, got 'a,b'"),
    (["--loss-type", "sigmoid,ipo", "--loss-weights", "1"], "loss_weights has 1 entries but loss_type has 2"),
    (["--f-divergence-type", "wasserstein"], "--f-divergence-type must be one of reverse_kl, forward_kl, "),
    (["--loss-type", "robust", "--label-smoothing", "0.7"], "label_smoothing must lie in [0, 0.5)"),
    (["--ld-alpha", "1.5"], "--ld-alpha: ld_alpha must be None or a number in [0, 1], got 1.5"),
    (["--ld-alpha", "-1"], "--ld-alpha must be a number >= 0"),
    (["--ld-alpha", "0.5", "--loss-type", "sigmoid,sft"], "--ld-alpha: ld_alpha with loss_type 'sft'"),
    (["--use-weighting", "--loss-type", "aot"], "--use-weighting: use_weighting: per-pair weights are not defined"),
    (["--reference-free", "--loss-type", "bco_pair"], "--reference-free: loss_type bco_pair needs a reference"),
    (["--reference-free", "--ref-model", "org/ref"], "--reference-free: --ref-model gives a reference"),
    (["--report-to", "wandb"], "--report-to wandb needs the wandb package"),
    (["--report-to", "none,tensorboard"], "--report-to must be none, tensorboard, wandb"),
    (["--logging-steps", "0"], "--logging-steps must be an integer >= 1"),
    (["--save-total-limit", "0"], "--save-total-limit must be an integer >= 1"),
    (["--dataset-split", "test"], "--dataset-config/--dataset-split apply to a Hugging Face or saved --dataset"),
    (["--resume", "/nowhere/checkpoint-3"], "--resume '/nowhere/checkpoint-3': not a checkpoint directory"),
    (["--attn-implementation", "flash_attention_2"], "--attn-implementation 'flash_attention_2': the demo model"),
]


@pytest.mark.parametrize("args, culprit", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_fails_at_once(tmp_path, capsys, args, culprit):
    assert_fails(tmp_path, capsys, culprit, *args)


def bad_data(tmp_path):
    """name -> (file, what the message must say)."""
    d = tmp_path / "data"
    d.mkdir()
    good = [json.dumps(r) for r in ROWS]
    (d / "empty.jsonl").write_text("")
    (d / "corrupt.jsonl").write_text("\n".join(good[:2] + ['{"prompt": "p", "chosen": x}'] + good[2:]))
    (d / "null.jsonl").write_text("\n".join(good[:4] + [json.dumps({**ROWS[0], "chosen": None})]))
    (d / "number.jsonl").write_text("\n".join(good[:1] + [json.dumps({**ROWS[0], "rejected": 7})]))
    (d / "nocontent.jsonl").write_text(json.dumps({"prompt": [{"role": "user"}], "chosen": [], "rejected": []}))
    (d / "columns.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (d / "allval.jsonl").write_text("\n".join(json.dumps({**r, "split": "validation"}) for r in ROWS))
    (d / "badsplit.jsonl").write_text("\n".join(json.dumps({**r, "split": "holdout"}) for r in ROWS))
    (d / "longprompts.jsonl").write_text("\n".join(json.dumps({**r, "prompt": "word " * 300}) for r in ROWS))
    (d / "notes.txt").write_text("hello")
    (d / "array.json").write_text(json.dumps([ROWS[0], 5]))
    return {
        "empty": ("empty.jsonl", "has no rows"),
        "corrupt": ("corrupt.jsonl", "corrupt.jsonl line 3: not valid JSON"),
        "null": ("null.jsonl", "null.jsonl line 5: 'chosen' is null"),
        "number": ("number.jsonl", "number.jsonl line 2: 'rejected' must be a string or a list of messages"),
        "nocontent": ("nocontent.jsonl", "line 1: 'prompt' message 0 needs 'role' and 'content' strings"),
        "columns": ("columns.jsonl", "needs 'chosen' and 'rejected' columns"),
        "allval": ("allval.jsonl", "every row has an eval split value"),
        "badsplit": ("badsplit.jsonl", "line 1: unknown split 'holdout'"),
        "longprompts": ("longprompts.jsonl", "no example fits max_length=96: every prompt is at least that long"),
        "txt": ("notes.txt", "unsupported file type"),
        "array": ("array.json", "array.json item 1: expected a JSON object, got int"),
        "missing": ("missing.jsonl", "no such file"),
        "missing-relative": ("./nowhere/prefs", "no such file"),
    }


def test_bad_data_names_the_file_and_line(tmp_path, capsys):
    for name, (file, culprit) in bad_data(tmp_path).items():
        path = file if file.startswith(".") else str(tmp_path / "data" / file)
        assert_fails(tmp_path, capsys, culprit, "--dataset", path, out=f"run-{name}")


def test_bad_yaml(tmp_path, capsys):
    cases = {"steps: 3.7\n": "--steps must be an integer >= 1, got 3.7",
             "learning_rate: 1e-4\n": "unknown option 'learning_rate'",
             "- 1\n- 2\n": "expected a mapping of option: value",
             "steps: [1\n": "not valid YAML at line",
             "resume: maybe\n": "--resume 'maybe': not a checkpoint directory",
             "report_to: mlflow\n": "--report-to must be none, tensorboard, wandb"}
    for i, (text, culprit) in enumerate(cases.items()):
        y = tmp_path / f"c{i}.yaml"
        y.write_text(text)
        assert_fails(tmp_path, capsys, culprit, "--config", y, out=f"run{i}")
    assert_fails(tmp_path, capsys, "cannot read it", "--config", tmp_path / "missing.yaml")


def test_yaml_values_go_through_the_flags_parser(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 1e-4\nbeta: 0.3\nsteps: 7\nmax-length: 64\n")    # PyYAML reads 1e-4 as a string
    cfg, given = cli.config_from_args(["train", "--config", str(y), "--steps", "9"])
    assert (cfg.lr, cfg.beta, cfg.steps, cfg.max_length) == (1e-4, 0.3, 9, 64)
    assert {"lr", "beta", "steps", "max_length"} <= given


def test_defaults_follow_what_is_trained(tmp_path):
    demo = build({}, set())
    assert (demo.lr, demo.max_length) == (1e-3, 96)
    model = build({"model": "org/name"}, {"model"})
    assert (model.lr, model.max_length) == (1e-6, 1024)                 # TRL's DPOConfig defaults
    given = build({"model": "org/name", "lr": "5e-6"}, {"model", "lr"})
    assert (given.lr, given.max_length) == (5e-6, 1024)


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text
    assert text.count("(default: 200)") == 1
    assert "(default: 0.1) (default" not in text
    from fastdpo.train.config import FIELDS
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in text


def test_help_groups_the_options_and_lists_choices(capsys):
    from fastdpo._loss_names import F_DIVERGENCES, LOSS_TYPES
    from fastdpo.train.config import FIELDS, GROUPS
    grouped = [name for _, names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(FIELDS)                     # each option in exactly one group
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())            # argparse wraps lines
    titles = ["model", "data", "loss", "training", "layout", "output", "distributed"]
    positions = [text.find(f"{t} options:") for t in titles]
    assert -1 not in positions and positions == sorted(positions)
    assert "other options:" not in text
    assert "one or more (comma-separated) of: " + ", ".join(LOSS_TYPES) in text
    assert "--f-divergence-type {" + ",".join(F_DIVERGENCES) + "}" in text
    assert "--schedule {cosine,linear,constant}" in text


QUICK = """
import sys
from fastdpo.train import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(code, sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules))
"""


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["--bogus"], 2), (["--steps", "0"], 2),
                                        (["--loss-type", "sigmoid,nope"], 2), (["--schedule", "cosine!"], 2),
                                        (["--lora-alpha", "8"], 2)], ids=["help", "unknown", "rule", "loss-type",
                                                                          "choice", "cross-option"])
def test_help_and_bad_options_import_neither_torch_nor_transformers(args, code):
    """--help and argument errors answer before the heavy libraries load (they took seconds)."""
    run = subprocess.run([sys.executable, "-c", QUICK, "train", *args], capture_output=True, text=True, timeout=60)
    assert run.stdout.splitlines()[-1] == f"{code} []", run.stdout[-500:] + run.stderr[-500:]
    if code:
        assert len(run.stderr.strip().splitlines()) <= 2, run.stderr    # argparse's usage line, then the error


def test_bad_model_paths(tmp_path, capsys):
    (tmp_path / "weights.bin").write_text("x")
    assert_fails(tmp_path, capsys, "is a file; give the model's directory", "--model", tmp_path / "weights.bin")
    assert_fails(tmp_path, capsys, "no such directory", "--model", tmp_path / "no-model")
    assert_fails(tmp_path, capsys, "--model 'no/such-model-here': cannot load it", "--model", "no/such-model-here")


def test_output_dir_in_the_way(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_fails(tmp_path, capsys, "is not writable", out="file/sub")
    assert_fails(tmp_path, capsys, "is a file", out="file")
    assert_fails(tmp_path, capsys, "--resume: no checkpoint", "--resume", out="never-ran")


SHORT = ["--steps", "3", "--batch-size", "4", "--eval-every", "0", "--save-every", "0", "--warmup-steps", "1"]


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert run(tmp_path, capsys, "--dataset", data, *SHORT)[0] == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    code, err = run(tmp_path, capsys, "--dataset", data, *SHORT)
    assert code == cli.EXIT_ERROR and len(err) == 1 and "already holds a run" in err[0]
    assert "--resume" in err[0] and "--overwrite" in err[0]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics           # nothing lost
    code, err = run(tmp_path, capsys, "--dataset", data, *SHORT, "--overwrite", "--beta", "0.5")
    assert code == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["beta"] == 0.5
    # a broken --overwrite run replaces nothing
    code, err = run(tmp_path, capsys, "--dataset", str(tmp_path / "missing.jsonl"), *SHORT, "--overwrite")
    assert code == cli.EXIT_ERROR and os.path.exists(tmp_path / "run" / "model")


def test_resume_may_raise_steps_and_compares_resolved_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    common = ["--batch-size", "4", "--eval-every", "0", "--save-every", "0", "--warmup-steps", "1"]
    assert run(tmp_path, capsys, "--dataset", "d.jsonl", "--steps", "3", *common, out="a")[0] == 0
    assert run(tmp_path, capsys, "--dataset", "./d.jsonl", "--steps", "5", *common, "--resume", out="a")[0] == 0
    steps = [r["step"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]
    code, err = run(tmp_path, capsys, "--dataset", str(tmp_path / "d.jsonl"), "--steps", "5", *common, "--resume",
                    out="a")
    assert code == cli.EXIT_ERROR and "is at step 5 already; raise --steps" in err[0]


def test_file_types_and_split_names(tmp_path):
    """.jsonl.gz, .json (array or lines), .csv and .parquet load locally; split values validation/test are eval."""
    import pandas as pd
    from fastdpo.train import prefs
    rows = [{**r, "split": "test" if i % 4 == 0 else "train"} for i, r in enumerate(ROWS)]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl.gz", "d.json", "lines.json", "d.csv", "d.parquet"):
        train, held = prefs.load_pairs(str(tmp_path / name), 0.1, 0)
        assert (len(train), len(held)) == (9, 3), name
        assert held[0]["prompt"] == "where is order 0?", name


def test_implicit_prompt_and_eos_as_trl(tmp_path):
    """TRL's rules: the space before the point where chosen and rejected part goes to the completions; text
    completions get one EOS; conversational ones get the template's end of turn and no second EOS."""
    from trl.data_utils import extract_prompt

    from fastdpo.train import prefs
    from fastdpo.train.tokenizer import trained_tokenizer
    row = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    ours = prefs._explicit(row, "row")
    assert ours == extract_prompt(row) == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    tok = trained_tokenizer(ROWS, 300, str(tmp_path))
    _, c, _, _ = prefs.tokenize_pair({"prompt": "q", "chosen": " a", "rejected": " b"}, tok)
    assert c[-1] == tok.eos_token_id and c.count(tok.eos_token_id) == 1
    _, c, _, _ = prefs.tokenize_pair({"prompt": "q", "chosen": " a</s>", "rejected": " b"}, tok)
    assert c.count(tok.eos_token_id) == 1                       # already there: not added twice
    chat = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}]}
    _, c, _, _ = prefs.tokenize_pair(chat, tok)
    assert c.count(tok.eos_token_id) == 1 and c[-1] == tok.eos_token_id     # the template's own, once


def test_truncation_is_counted(tmp_path):
    from fastdpo.train import prefs
    from fastdpo.train.tokenizer import trained_tokenizer
    tok = trained_tokenizer(ROWS, 300, str(tmp_path))
    pairs = [{"prompt": "q", "chosen": " long answer " * 20, "rejected": " no"}] * 3 + [ROWS[0]]
    with pytest.warns(UserWarning, match="truncated the completions of 3 of 4 examples to fit max_length=16"):
        out = prefs.tokenize(pairs, tok, 16, "train")
    assert all(len(e.prompt) + len(e.chosen) <= 16 for e in out)


def test_constant_schedule_holds_after_warmup():
    cfg = build({"schedule": "constant", "warmup_steps": "2", "steps": "10"}, {"schedule"})
    f = trainer.lr_lambda(cfg)
    assert [f(s) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]


def wait_for_step(path, step, proc, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        if os.path.exists(path):
            with open(path) as f:
                if any(json.loads(line).get("step", -1) >= step and "loss" in line for line in f if line.strip()):
                    return
        time.sleep(0.2)
    raise AssertionError("no progress")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_writes_a_checkpoint_and_resume_continues_bitwise(tmp_path, sig):
    """Ctrl-C (or SIGTERM) mid-run: the step finishes, a checkpoint is written at it, one line names it; --resume
    then gives the losses of an uninterrupted run."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 4)
    args = ["--dataset", data, "--steps", "30", "--batch-size", "4", "--eval-every", "0", "--save-every", "0",
            "--warmup-steps", "2", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastdpo", "train", "--output-dir", str(tmp_path / "cut"), *args],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    wait_for_step(tmp_path / "cut" / "metrics.jsonl", 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("fastdpo train:")]
    assert proc.returncode == cli.EXIT_INTERRUPTED, err[-2000:]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"fastdpo train: {sig.name} at step ") and "continue with --resume" in lines[0]
    stopped = int(lines[0].split(" at step ")[1].split(":")[0])
    with open(tmp_path / "cut" / f"checkpoint-{stopped}" / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == stopped >= 3
    if sig == signal.SIGTERM:
        return
    resumed = subprocess.run([sys.executable, "-m", "fastdpo", "train", "--output-dir", str(tmp_path / "cut"),
                              *args, "--resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                        # as in the subprocesses (OMP_NUM_THREADS=1): the same bits
    try:
        assert cli.main(["train", "--output-dir", str(tmp_path / "straight"), *args]) == 0
    finally:
        torch.set_num_threads(threads)

    def losses(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / out / "metrics.jsonl").open())
                if "loss" in r]
    assert losses("cut") == losses("straight")
    assert [s for s, _ in losses("cut")] == list(range(1, 31))


def tiny_model_dir(tmp_path) -> str:
    """A tiny random Llama with a tokenizer trained on ROWS, saved as --model takes it."""
    from families import tiny
    from fastdpo.train.tokenizer import trained_tokenizer
    path = tmp_path / "tiny-model"
    tok = trained_tokenizer(ROWS, 300, str(tmp_path / "tok"))
    tiny("llama", vocab=len(tok)).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


NOISE = ("Loading weights", "Writing model shards", "Generating train split", "FutureWarning", "it/s]", "%|",
         "examples/s]")


def test_no_progress_silences_the_libraries_too(tmp_path):
    """--no-progress: no bar or message of transformers (loading), datasets (a data directory's splits), peft
    (--lora-r's FutureWarning), nor fastdpo's own; the run still says what it did."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    env = {k: v for k, v in os.environ.items() if "PROGRESS_BARS" not in k}        # the switches' variables
    env.update(OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"))
    args = ["--model", tiny_model_dir(tmp_path), "--dataset", str(tmp_path / "data"), "--lora-r", "4", "--no-progress",
            "--steps", "1", "--batch-size", "4", "--eval-every", "0", "--save-every", "0", "--max-length", "32",
            "--output-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    run = subprocess.run([sys.executable, "-m", "fastdpo", "train", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not [n for n in NOISE if n in run.stderr + run.stdout], run.stderr[-2000:]
    assert "run directory:" in run.stdout


def test_no_progress_silences_transformers_writing_bar_and_sets_it_back(tmp_path, capfd):
    from families import tiny
    from transformers.utils import logging as transformers_logging
    model = tiny("llama")
    transformers_logging.enable_progress_bar()
    model.save_pretrained(str(tmp_path / "a"))
    assert "Writing model shards" in capfd.readouterr().err          # what --no-progress has to silence
    with cli._quiet_libraries(build({}, set())):
        model.save_pretrained(str(tmp_path / "b"))
        assert "Writing model shards" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()
