"""The run directory never mixes runs, never resumes on changed inputs, and a failed write loses nothing: one writer
per --output-dir, --resume compares the model files and the tokenized data, a full disk or an unwritable cache
directory ends in one line, partial files of a killed run are removed at its next start."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fastdpo.train import cli, ref_cache, runs

pytest.importorskip("datasets")

ROWS = [{"prompt": f"where is order {i}?", "chosen": f" Order {i} ships today.", "rejected": " No idea."}
        for i in range(16)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(tmp_path, capsys, *args, out="run"):
    """cli.main in this process -> (exit code, the 'fastdpo train:' lines of stderr)."""
    code = cli.main(["train", "--output-dir", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache"),
                     "--no-progress", "--batch-size", "4", "--eval-every", "0", "--warmup-steps", "0",
                     *map(str, args)])
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("fastdpo train:") and not line.startswith("fastdpo train: warning:")]
    return code, err


def start(tmp_path, *args, out="run"):
    return subprocess.Popen([sys.executable, "-m", "fastdpo", "train", "--output-dir", str(tmp_path / out),
                             "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--batch-size", "4",
                             "--eval-every", "0", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(predicate, proc, what, limit=240):
    deadline = time.time() + limit
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {limit} s")


def test_a_second_run_on_a_busy_output_dir_is_refused_naming_the_first(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = start(tmp_path, "--dataset", data, "--steps", "400", "--save-every", "0")
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, first, "a first step")
        code, err = run(tmp_path, capsys, "--dataset", data, "--steps", "2", "--seed", "2", "--overwrite")
        assert code == cli.EXIT_ERROR and len(err) == 1, err
        assert "is in use by another fastdpo train" in err[0] and f"pid {first.pid} " in err[0], err[0]
        assert "--output-dir" in err[0]
    finally:
        first.kill()                      # kill -9: the kernel drops its lock with the process
        first.wait()
    code, err = run(tmp_path, capsys, "--dataset", data, "--steps", "2", "--overwrite")
    assert code == 0, err


KILLED_IN_A_WRITE = textwrap.dedent("""
    import sys, time, torch
    from fastdpo.train import cli, runs
    real = torch.save
    def slow_save(obj, path, *a, **k):
        real(obj, path, *a, **k)
        if str(path).endswith("optimizer.pt"):      # the checkpoint is half written: kill -9 lands here
            print("IN-WRITE", flush=True)
            time.sleep(600)
    runs.torch.save = slow_save
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_kill_9_in_a_checkpoint_write_leaves_the_last_checkpoint_and_the_next_start_cleans_up(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    args = ["--dataset", data, "--steps", "4", "--save-every", "2", "--batch-size", "4", "--eval-every", "0",
            "--warmup-steps", "0", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_IN_A_WRITE, "train", "--output-dir", str(tmp_path / "run"),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        reached = any(line.strip() == "IN-WRITE" for line in proc.stdout)   # other libraries may print first
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert reached, proc.stderr.read()[-2000:]
    left = sorted(os.listdir(tmp_path / "run"))
    assert any(runs.TEMPORARY.search(name) for name in left), left          # the killed write's partial checkpoint
    assert not any(name.startswith("checkpoint-") for name in left), left     # never under its final name
    # the first checkpoint was the one being written: nothing to resume, said in one line; the partial files go
    code, err = run(tmp_path, capsys, *args[:6], "--resume")
    assert code == cli.EXIT_ERROR and err == [f"fastdpo train: error: --resume: no checkpoint in "
                                              f"{str(tmp_path / 'run')!r}"], err
    code, err = run(tmp_path, capsys, *args[:6], "--overwrite")
    assert code == 0, err
    assert not [n for n in os.listdir(tmp_path / "run") if runs.TEMPORARY.search(n)]


def tiny_model_dir(tmp_path, name="model"):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from fastdpo.train import prefs
    from fastdpo.train.tokenizer import trained_tokenizer
    pairs, _ = prefs.load_pairs(write_jsonl(tmp_path / "tok.jsonl", ROWS), 0.25, 0)
    tok = trained_tokenizer(pairs, 200, str(tmp_path / "tokcache"))
    assert isinstance(tok, PreTrainedTokenizerFast)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id))
    path = str(tmp_path / name)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


def test_resume_refuses_changed_model_weights_or_data_and_continues_on_the_same(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    model_dir, model = tiny_model_dir(tmp_path)
    common = ["--model", model_dir, "--dataset", data, "--save-every", "1"]
    assert run(tmp_path, capsys, *common, "--steps", "1")[0] == 0
    assert json.load(open(tmp_path / "run" / "config.json"))["inputs"]["model"]

    # --steps raised on unchanged inputs: resumes
    assert run(tmp_path, capsys, *common, "--steps", "2", "--resume") == (0, [])

    # the same file names, shapes and size, other values (the lm_head x 100)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
    model.save_pretrained(model_dir)
    code, err = run(tmp_path, capsys, *common, "--steps", "3", "--resume")
    assert code == cli.EXIT_ERROR and len(err) == 1 and "--resume: --model changed since the run" in err[0], err

    # the data file's rows replaced (same path)
    _, model = tiny_model_dir(tmp_path, "model2")
    model_dir2 = str(tmp_path / "model2")
    assert run(tmp_path, capsys, "--model", model_dir2, "--dataset", data, "--save-every", "1", "--steps", "1",
               out="run2")[0] == 0
    write_jsonl(tmp_path / "d.jsonl", [{**r, "chosen": r["chosen"] + " Sorry."} for r in ROWS])
    code, err = run(tmp_path, capsys, "--model", model_dir2, "--dataset", data, "--save-every", "1", "--steps", "2",
                    "--resume", out="run2")
    assert code == cli.EXIT_ERROR and len(err) == 1, err
    assert "--resume: the training data (--dataset) and the evaluation data" in err[0], err[0]


def test_resume_of_the_demo_model_after_the_data_changed_is_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert run(tmp_path, capsys, "--dataset", data, "--steps", "1", "--save-every", "1")[0] == 0
    write_jsonl(tmp_path / "d.jsonl", [{**r, "prompt": "Quick: " + r["prompt"]} for r in ROWS])
    code, err = run(tmp_path, capsys, "--dataset", data, "--steps", "2", "--resume")
    # the demo's tokenizer is trained on the rows: its vocabulary check or the data key, whichever sees it first
    assert code == cli.EXIT_ERROR and len(err) == 1 and err[0].startswith("fastdpo train: error: --resume: "), err
    assert "--dataset" in err[0] and "changed since" in err[0], err


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder (root only; skipped where mounting is not allowed)."""
    mounted = []

    def mount(options):
        path = tmp_path / f"mnt{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path
    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_a_full_disk_ends_in_one_line_and_leaves_no_partial_files(tmp_path, capsys, tmpfs):
    disk = tmpfs("size=3m")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = disk / "run"
    code = cli.main(["train", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                     "--dataset", data, "--steps", "2", "--save-every", "1", "--batch-size", "4"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastdpo train: error")]
    assert code == cli.EXIT_ERROR and len(err) == 1, err
    # 3 MB hold the first checkpoint of the demo model (~1.4 MB) and not the second
    assert (f"--output-dir: cannot write {str(out / 'checkpoint-2')!r} (no space left on the device); the last "
            "good checkpoint, checkpoint-1, is intact") in err[0], err[0]
    assert runs.checkpoints(str(out)) == [(1, str(out / "checkpoint-1"))]
    assert not [n for n in os.listdir(out) if runs.TEMPORARY.search(n)], os.listdir(out)
    # resuming on the still-full disk fails the same way, in one line, and leaves nothing behind either
    code = cli.main(["train", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                     "--dataset", data, "--steps", "2", "--save-every", "1", "--batch-size", "4", "--resume"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fastdpo train: error")]
    assert code == cli.EXIT_ERROR and len(lines) == 1 and "no space left on the device" in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not [n for n in os.listdir(out) if runs.TEMPORARY.search(n)], os.listdir(out)
    assert runs.checkpoints(str(out)) == [(1, str(out / "checkpoint-1"))]


def test_a_read_only_cache_dir_is_named_before_anything_is_written(tmp_path, capsys, tmpfs):
    readonly = tmpfs("ro,size=1m")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    code = cli.main(["train", "--output-dir", str(tmp_path / "run"), "--cache-dir", str(readonly / "c"),
                     "--no-progress", "--dataset", data, "--steps", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastdpo train: error")]
    assert code == cli.EXIT_ERROR and err == [f"fastdpo train: error: --cache-dir {str(readonly / 'c')!r} is not "
                                              "writable (Read-only file system)"], err
    assert not (tmp_path / "run").exists()


def test_cache_entries_are_listed_and_pruned_least_recently_used_first(tmp_path):
    cache = str(tmp_path / "cache")
    for i in range(3):
        ref_cache.save(cache, f"{i}" * 64, torch.zeros(100, 2, dtype=torch.float64), about={"model": f"m{i}"})
        os.utime(ref_cache._path(cache, f"{i}" * 64), (1000 + i, 1000 + i))
    assert ref_cache.load(cache, "0" * 64, 100) is not None           # a hit: now the most recent
    listed = ref_cache.entries(cache)
    assert [e[3]["model"] for e in listed] == ["m0", "m2", "m1"]
    size = listed[0][1]
    removed = ref_cache.prune(cache, max_bytes=2 * size)
    assert removed == [ref_cache._path(cache, "1" * 64)]
    removed = ref_cache.prune(cache, older_than_days=1)
    assert removed == [ref_cache._path(cache, "2" * 64)]
    assert [e[3]["model"] for e in ref_cache.entries(cache)] == ["m0"]
    open(os.path.join(cache, "ref-logps-x.pt.tmp-999999999"), "w").close()     # a killed writer's (no such pid)
    open(os.path.join(cache, f"ref-logps-y.pt.tmp-{os.getpid()}"), "w").close()  # a live one's
    ref_cache.remove_partial(cache)
    assert sorted(n for n in os.listdir(cache) if ".tmp-" in n) == [f"ref-logps-y.pt.tmp-{os.getpid()}"]


def test_fastdpo_cache_lists_and_prunes_the_reference_cache(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    for i in range(2):
        ref_cache.save(cache, f"{i}" * 64, torch.zeros(1000, 2, dtype=torch.float64),
                       about={"model": f"m{i}", "split": "train"})
        os.utime(ref_cache._path(cache, f"{i}" * 64), (1000 + i, 1000 + i))
    assert cli.main(["cache", "list", "--cache-dir", cache]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "model m1, split train" in out[0] and "model m0, split train" in out[1]
    assert out[-1].startswith("2 entries, ")
    assert cli.main(["cache", "prune", "--cache-dir", cache]) == 2
    assert "give --max-size and/or --older-than" in capsys.readouterr().err
    assert cli.main(["cache", "prune", "--cache-dir", cache, "--max-size", "20K"]) == 0
    assert capsys.readouterr().out.startswith("removed 1 entries; 1 left")
    assert [e[3]["model"] for e in ref_cache.entries(cache)] == ["m1"]
