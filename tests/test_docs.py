"""The README and docs/ as a reader uses them: every relative link (and #anchor) resolves, every python snippet of
the README runs as printed, every `fastdpo train` command in them parses, docs/trainer.md lists every option of
`fastdpo train --help` in its group, and the README's plots are drawn from bench/RESULTS.md."""
import importlib.util
import pathlib
import re
import shlex
import subprocess
import sys
import unicodedata

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]]|\][^(])*?\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def blocks(text: str, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(text) if kind == lang]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links, code and emphasis marks dropped), lower-cased, without
    punctuation or symbols (letters, digits, marks, '-' and '_' stay), each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = "".join(c for c in text.lower() if c in "-_ " or unicodedata.category(c)[0] in "LNM")
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """Every heading's anchor in a markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen, out = {}, set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            base = slug(m.group(1).strip())
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_follows_githubs_rules():
    assert slug("CPU, fp32, 2 cores: `sequence_logps`, 2026-11-27") == "cpu-fp32-2-cores-sequence_logps-2026-11-27"
    assert slug("TRL's DPOTrainer (`bench/trainer_compare.py`)") == "trls-dpotrainer-benchtrainer_comparepy"
    assert slug("Peak memory per pair (`--memory-vs-context`)") == "peak-memory-per-pair---memory-vs-context"
    assert slug("prompts 192–384 tokens, 2 × 1k") == "prompts-192384-tokens-2--1k"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    """Files and #anchors (GitHub's slugs) of every relative link and image, outside code blocks."""
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):             # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with that anchor in {path.relative_to(ROOT)}")
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [p.name for p in PAGES[1:] if f"(docs/{p.name}" not in readme] == []


def test_each_docs_page_opens_with_what_a_reader_can_do():
    for page in PAGES[1:]:
        first = [line for line in page.read_text(encoding="utf-8").splitlines() if line.strip()][1]
        assert first.startswith("After reading this page you "), (page.name, first)


# ------------------------------------------------------------------------------------- fastdpo train, as documented

def train_commands():
    """(page, argv after `train`) of every `fastdpo train` command in a bash block of the README or docs/."""
    out = []
    for page in PAGES:
        for body in blocks(page.read_text(encoding="utf-8"), "bash"):
            for line in body.replace("\\\n", " ").splitlines():       # a command continued with "\" is one line
                words = shlex.split(line, comments=True)
                for i, (a, b) in enumerate(zip(words, words[1:])):
                    if a == "fastdpo" and b == "train":
                        out.append((page.name, words[i + 2:]))
    return out


PATHS = {"--model": "dir", "--ref-model": "dir", "--tokenizer": "dir", "--dataset": "file", "--eval-dataset": "file",
         "--config": "yaml"}


def test_documented_train_commands_parse(tmp_path, monkeypatch):
    """Each documented command line is accepted by the parser and its typed checks (no model or data loads); the
    local paths it names exist here as empty stand-ins (a path that does not exist is refused, as it should)."""
    from fastdpo.train import cli
    monkeypatch.chdir(tmp_path)
    commands = train_commands()
    assert len(commands) >= 5
    for page, argv in commands:
        if "--help" in argv:
            continue
        for option, value in zip(argv, argv[1:]):
            kind = PATHS.get(option)
            if kind == "dir" and value.startswith((".", "/", "~")):
                pathlib.Path(value).mkdir(parents=True, exist_ok=True)
            elif kind in ("file", "yaml") and not pathlib.Path(value).exists():
                pathlib.Path(value).write_text("{}\n" if kind == "yaml" else "")
        cli.config_from_args(["train", *argv])       # raises on an unknown option or a bad value


def option_tables() -> str:
    """docs/trainer.md's option tables, generated from `fastdpo train --help`'s groups, flags and texts."""
    import argparse
    from fastdpo.train import cli
    train = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    out = []
    for group in train._action_groups:
        if group.title in ("options", "positional arguments"):      # --help, --config: explained above the tables
            continue
        about = group.description or ""
        out += [f"### {group.title}", "", about[:1].upper() + about[1:] + ".", "", "| option | what it does |",
                "|---|---|"]
        for action in group._group_actions:
            if isinstance(action, argparse.BooleanOptionalAction):
                flags = ", ".join(f"`{s}`" for s in action.option_strings)
            elif action.nargs == "?":
                flags = f"`{action.option_strings[0]} [{action.metavar}]`"
            else:
                flags = f"`{action.option_strings[0]} {action.metavar or action.dest.upper()}`"
            out.append(f"| {flags} | {action.help.replace('|', chr(92) + '|')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def test_trainer_page_lists_every_option_of_help_in_its_group():
    """docs/trainer.md holds `fastdpo train --help`'s options, group by group, with their texts and defaults."""
    text = (ROOT / "docs" / "trainer.md").read_text(encoding="utf-8")
    assert "`--config YAML`" in text
    assert option_tables() in text, ("docs/trainer.md's option tables differ from `fastdpo train --help`: replace "
                                     "them with the output of `python tests/test_docs.py`")


# ------------------------------------------------------------------------------------------ the README's snippets

def byte_tokenizer():
    """One byte = one token (GPT-2's byte alphabet, no merges), plus <pad> and </s>: any text has tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={"<pad>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def fake_hub(home: pathlib.Path, names):
    """A tiny Qwen2 and a byte-level tokenizer saved as each hub `name` in a local Hugging Face cache: the README's
    snippets then run as printed, offline, in seconds."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                                         bos_token_id=None))
    revision = "0" * 40
    for name in names:
        repo = home / "hub" / ("models--" + name.replace("/", "--"))
        model.save_pretrained(repo / "snapshots" / revision)
        tokenizer.save_pretrained(repo / "snapshots" / revision)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)


SNIPPETS = blocks((ROOT / "README.md").read_text(encoding="utf-8"), "python")


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i + 1}" for i in range(len(SNIPPETS))])
def test_readme_python_snippet_runs(snippet, tmp_path):
    import os
    names = sorted(set(re.findall(r"""["']([\w.-]+/[\w.-]+)["']""", snippet)) - {"runs/trl"})
    fake_hub(tmp_path / "hf", names)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_readme_has_the_three_snippets():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(SNIPPETS) == 2 and "model_dpo_loss" in SNIPPETS[0] and "FastDPOTrainer" in SNIPPETS[1]
    assert any("fastdpo train" in b for b in blocks(text, "bash"))


# --------------------------------------------------------------------------------------------------- the plots

def test_plots_are_drawn_from_results_and_captioned_with_their_device_and_date(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("plots", ROOT / "bench" / "plots.py")
    plots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plots)
    written = plots.main(["--out-dir", str(tmp_path)])
    assert [pathlib.Path(p).name for p in written] == ["memory_vs_context.png", "speed_ratios.png"]
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    for name in ("memory_vs_context.png", "speed_ratios.png"):
        assert f"](bench/{name})" in readme
    text = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    dates = {plots.device_and_date(t).rsplit(", ", 1)[1]
             for t in [plots.trainer_memory(text)[1], plots.op_memory(text)[1]]}
    dates |= {title.split(", ")[-2] for title, _ in plots.speed_ratios(text)}
    caption = readme[readme.index("## Results"):readme.index("## Documentation")]
    assert all(d in caption for d in dates), (dates, caption)


if __name__ == "__main__":                          # docs/trainer.md's option tables, to paste after a CLI change
    sys.path.insert(0, str(ROOT))
    print(option_tables(), end="")
