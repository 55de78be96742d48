"""Data and paths that used to end deep inside the run, or quietly train on nothing: each now ends in one line naming
the option, file and line (or row), before anything is written; an example with nothing to score is dropped and
counted, as the other unusable examples are."""
import json
import os

import pytest

from fastdpo.train import cli, prefs
from fastdpo.train.tokenizer import check_resumable, trained_tokenizer
from test_cli import ROWS, assert_fails, run, tiny_model_dir, write_jsonl

pytest.importorskip("datasets")

EMPTY = {"prompt": "", "chosen": "", "rejected": ""}


def no_bos_model_dir(tmp_path) -> str:
    """The tiny model of test_cli with a tokenizer that adds no BOS (as Qwen2's): an empty prompt encodes to []."""
    path = tiny_model_dir(tmp_path)
    with open(os.path.join(path, "tokenizer.json")) as f:
        spec = json.load(f)
    spec["post_processor"] = None
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    return path


def test_data_without_any_completion_is_refused_before_anything_is_written(tmp_path, capsys):
    """Every completion empty: with --model this ended in 'hidden is an empty batch' after config.json was written;
    with the demo model it trained (accuracy 0.000 -> 0.000)."""
    data = write_jsonl(tmp_path / "empty.jsonl", [EMPTY] * 12)
    culprit = "no example has a non-empty completion: in all 11 training rows 'chosen' and 'rejected' are empty"
    assert_fails(tmp_path, capsys, culprit, "--dataset", data, out="demo")
    model = no_bos_model_dir(tmp_path)
    capsys.readouterr()                                  # its "Writing model shards" bar
    assert_fails(tmp_path, capsys, culprit, "--dataset", data, "--model", model, out="model")
    same = write_jsonl(tmp_path / "same.jsonl", [{"chosen": "text", "rejected": "text"}] * 4)   # implicit prompt
    assert_fails(tmp_path, capsys, "once the prompt (the start they share) is taken off", "--dataset", same,
                 out="same")


def test_an_example_with_nothing_to_score_is_dropped_and_counted(tmp_path):
    """An empty prompt without BOS and an empty completion: the completion is the lone EOS at position 0, which
    nothing precedes, so no token of it is scored (a batch of only such rows gave the kernels an empty batch).
    It is dropped with a warning; a one-token completion after a real prompt is kept."""
    tok = trained_tokenizer(ROWS, 300, str(tmp_path / "tok"))
    tok._tokenizer.post_processor = None
    assert tok(text="")["input_ids"] == []
    pairs = [EMPTY, {"prompt": "", "chosen": "yes", "rejected": "no"}, {"prompt": "q", "chosen": "", "rejected": ""}]
    with pytest.warns(UserWarning, match=r"dropped 1 of 3 examples with an empty chosen or rejected completion"):
        kept = prefs.tokenize(pairs, tok, 32, "train")
    assert len(kept) == 2
    for e in kept:                   # each side scores at least one token: one after the prompt's first, if any
        assert min(len(e.chosen), len(e.rejected)) >= (1 if e.prompt else 2)


def test_a_string_prompt_with_message_completions_names_the_mismatch(tmp_path, capsys):
    chat = {"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}
    data = write_jsonl(tmp_path / "mixed.jsonl", [ROWS[0], {"prompt": "hi", **chat}])
    assert_fails(tmp_path, capsys, "mixed.jsonl line 2: 'prompt' is a string but 'chosen' and 'rejected' are message "
                 "lists; give all three as strings or all three as message lists", "--dataset", data)
    text = write_jsonl(tmp_path / "mixed2.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a",
                                                    "rejected": "b"}])
    assert_fails(tmp_path, capsys, "line 1: 'prompt' is a list of messages but 'chosen' and 'rejected' are strings",
                 "--dataset", text, out="run2")


def test_csv_and_parquet_errors_name_the_file_and_line_or_row(tmp_path, capsys):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "latin1.csv").write_bytes(b'prompt,chosen,rejected\nq1,"a\nb",c\nq2,caf\xe9,d\n')
    (tmp_path / "ragged.csv").write_text("prompt,chosen,rejected\nq1,a,b\nq2,a\n")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not a parquet file")
    bad = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(np.array([0, 2, 6], np.int32).tobytes()),
                                                 pa.py_buffer(b"okcaf\xe9")])           # row 1 is not UTF-8
    pq.write_table(pa.table({"prompt": bad, "chosen": ["a", "b"], "rejected": ["c", "d"]}), tmp_path / "bad.parquet")
    cases = {"latin1.csv": "latin1.csv line 4: not UTF-8 text (byte 0xe9 at column 7",
             "ragged.csv": "ragged.csv line 3: 2 fields, but the header line has 3",
             "junk.parquet": "junk.parquet: cannot read it as parquet",
             "bad.parquet": "bad.parquet row 1: cannot decode it"}
    for i, (name, culprit) in enumerate(cases.items()):
        assert_fails(tmp_path, capsys, culprit, "--dataset", tmp_path / name, out=f"run{i}")
    # a good CSV reads as pandas would: quoted line breaks kept, an empty field null
    (tmp_path / "good.csv").write_text('prompt,chosen,rejected\nq1,"a\nb",c\n,x,y\n')
    rows, _ = prefs.read_rows(str(tmp_path / "good.csv"))
    assert [r for r, _ in rows] == [{"prompt": "q1", "chosen": "a\nb", "rejected": "c"},
                                    {"prompt": None, "chosen": "x", "rejected": "y"}]
    assert [w.rsplit(" ", 2)[1:] for _, w in rows] == [["line", "2"], ["line", "4"]]


@pytest.mark.parametrize("option", ["--model", "--ref-model", "--tokenizer", "--dataset", "--eval-dataset"])
def test_a_missing_local_path_fails_at_once_naming_the_option(tmp_path, capsys, monkeypatch, option):
    """models/nope when ./models exists, ./x, a/b/c: local paths, never asked of the hub (~45 s of retries online)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    what = "file or directory" if "dataset" in option else "directory"
    for i, (value, why) in enumerate([("models/nope", "(read as a local path: 'models/' exists here)"),
                                      ("./nope", ""), ("a/b/c", "(read as a local path: a hub name is org/name)")]):
        assert_fails(tmp_path, capsys, f"{option} {value!r}: no such {what} {why}".strip(), option, value,
                     *(["--model", str(tmp_path)] if option in ("--ref-model", "--tokenizer") else []), out=f"r{i}")


def test_resume_of_the_demo_after_its_data_changed_is_one_line(tmp_path, capsys):
    """The demo's tokenizer is trained on the rows: other rows, another vocabulary, and the checkpoint's
    embedding used to end in a 'size mismatch for model.embed_tokens.weight' traceback."""
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    short = ["--steps", "1", "--batch-size", "4", "--eval-every", "0", "--save-every", "0", "--warmup-steps", "1"]
    assert run(tmp_path, capsys, "--dataset", data, *short)[0] == 0
    write_jsonl(tmp_path / "d.jsonl", [{**r, "chosen": f" Parcel {i} arrives tomorrow morning."}
                                       for i, r in enumerate(ROWS)])
    code, err = run(tmp_path, capsys, "--dataset", data, *short[2:], "--steps", "2", "--resume")
    assert code == cli.EXIT_ERROR and len(err) == 1 and err[0].startswith("fastdpo train: error: --resume"), err
    checkpoint = str(tmp_path / "run" / "checkpoint-1")
    tok = trained_tokenizer([{"prompt": "x", "chosen": "y", "rejected": "z"}], 300, str(tmp_path / "tok"))
    with pytest.raises(ValueError, match=r"--resume: the demo model's tokenizer is trained on --dataset's rows, and "
                                         r"they changed since '.*checkpoint-1' was written \(a vocabulary of \d+ "
                                         r"tokens now, \d+ then\)"):
        check_resumable(tok, checkpoint)
