"""``fastdpo train``: flags and/or a YAML file (flags win), every option documented once with its default.

Flags and YAML values go through one typed parser (``config.coerce``); a bad option, bad data or an interrupt ends
the run with one line on stderr and a non-zero exit code, never a traceback (FASTDPO_DEBUG=1 shows it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from .. import __version__
from . import cache_cmd
from .config import FIELDS, GROUPS, ConfigError, build, flag, kind_of

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _default_text(name: str) -> str:
    default = FIELDS[name].default
    if default is None:
        return ""            # the help text says what happens without it
    return f" (default: {str(default).lower() if isinstance(default, bool) else default})"


def _choices_text(name: str) -> str:
    meta = FIELDS[name].metadata
    if not meta["choices"]:
        return ""
    return f"; {'one or more (comma-separated) of' if meta['several'] else 'one of'}: {', '.join(meta['choices'])}"


def _add_option(group, name: str) -> None:
    f = FIELDS[name]
    kind, _ = kind_of(name)
    text = f.metadata["help"] + _choices_text(name) + _default_text(name)
    if kind is bool:
        group.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=None, help=text)
    elif f.metadata["const"] is not None:
        group.add_argument(flag(name), nargs="?", const=f.metadata["const"], default=None, metavar="PATH", help=text)
    else:       # raw strings: config.coerce checks flags and YAML values alike (choices too, in one message)
        choices = f.metadata["choices"]
        metavar = ("{" + ",".join(choices) + "}" if choices and not f.metadata["several"]
                   else {int: "N", float: "X"}.get(kind, name.upper()))
        group.add_argument(flag(name), default=None, metavar=metavar, help=text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdpo", description="fastdpo: fast, lean DPO training")
    p.add_argument("--version", action="version", version=f"fastdpo {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a causal LM with DPO (no arguments: the built-in demo run)",
                       usage="%(prog)s [--config YAML] [OPTION ...]",
                       description="Train a causal LM with DPO. Without arguments: the built-in demo run.")
    t.add_argument("--config", help="YAML file of options (keys as below, with underscores or dashes); flags "
                                    "override it")
    placed = set()
    for title, (about, names) in GROUPS.items():
        group = t.add_argument_group(f"{title} options", about)
        for name in names:
            _add_option(group, name)
        placed.update(names)
    rest = [name for name in FIELDS if name not in placed]
    if rest:                                    # an option added to TrainConfig but not to config.GROUPS
        group = t.add_argument_group("other options")
        for name in rest:
            _add_option(group, name)
    cache_cmd.add_parser(sub)
    return p


def _yaml_options(path: str) -> dict:
    import yaml
    try:
        with open(path) as fh:
            options = yaml.safe_load(fh)
    except OSError as e:
        raise ConfigError(f"--config {path!r}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"--config {path!r}: not valid YAML{at} ({getattr(e, 'problem', None) or e})") from None
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping of option: value, got {type(options).__name__}")
    out = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"--config {path!r}: unknown option {key!r} (see fastdpo train --help)")
        out[name] = value
    return out


def config_from_args(argv):
    """(TrainConfig, the names the user set) from the command line of ``fastdpo train``."""
    return _train_config(vars(_parser().parse_args(argv)))


def _train_config(args: dict):
    args.pop("command")
    path = args.pop("config")
    options = _yaml_options(path) if path else {}
    options.update({k: v for k, v in args.items() if v is not None})
    return build(options, set(options)), set(options)


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


_default_format = warnings.formatwarning
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """fastdpo's own warnings as one line each (no source excerpt); other libraries' as Python shows them."""
    if os.path.abspath(filename).startswith(_PACKAGE + os.sep):
        return f"fastdpo train: warning: {message}\n"
    return _default_format(message, category, filename, lineno, line)


@contextlib.contextmanager
def _quiet_libraries(cfg):
    """--no-progress: the libraries' own switches for their bars and messages (transformers' "Loading weights" and
    "Writing model shards", the hub's downloads, datasets' "Generating train split"), and the FutureWarnings their
    internals raise at each other (peft reading transformers' deprecated ``is_gradient_checkpointing`` under
    --lora-r), which no option of fastdpo can act on. Set back afterwards."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging
    switches = [(transformers_logging.is_progress_bar_enabled, transformers_logging.disable_progress_bar,
                 transformers_logging.enable_progress_bar),
                (lambda: not hub.are_progress_bars_disabled(), hub.disable_progress_bars, hub.enable_progress_bars)]
    # datasets reads hub datasets and data directories only (local files are read without it): imported if used
    if "datasets" in sys.modules or any(d is not None and not os.path.isfile(d) for d in (cfg.dataset,
                                                                                           cfg.eval_dataset)):
        import datasets
        switches.append((datasets.is_progress_bar_enabled, datasets.disable_progress_bars,
                         datasets.enable_progress_bars))
    were_on = [is_on() for is_on, _, _ in switches]
    for _, off, _ in switches:
        off()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning,
                                    module=r"(transformers|peft|datasets|huggingface_hub|accelerate)(\.|$)")
            yield
    finally:
        for (_, _, on), was_on in zip(switches, were_on):
            if was_on:
                on()


def _error(e: BaseException) -> int:
    """ConfigError, data and model errors: one line (FASTDPO_DEBUG=1: the traceback)."""
    if os.environ.get("FASTDPO_DEBUG") == "1":
        raise e
    print(f"fastdpo train: error: {_one_line(e)}", file=sys.stderr)
    return EXIT_ERROR


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _warning_line          # data warnings as one line each, not a source excerpt
    try:
        args = _parser().parse_args(argv)           # --help and bad options end here, before torch is imported
        if args.command == "cache":
            return cache_cmd.run(args)
        cfg, _ = _train_config(vars(args))
    except (ValueError, OSError) as e:
        return _error(e)
    from .trainer import Interrupted, train
    try:
        with _quiet_libraries(cfg) if not cfg.progress else contextlib.nullcontext():
            summary = train(cfg)
    except Interrupted as e:
        print(f"fastdpo train: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("fastdpo train: interrupted at once; nothing saved since the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as e:
        return _error(e)
    if os.environ.get("RANK", "0") != "0":       # under torchrun, rank 0 reports
        return 0
    b, a = summary["before"], summary["after"]
    print(f"\n{summary['train_examples']} train / {summary['eval_examples']} eval pairs")
    if b:
        print(f"eval reward accuracy {b['eval_rewards/accuracies']:.3f} -> {a['eval_rewards/accuracies']:.3f}; "
              f"margin {b['eval_rewards/margins']:.3f} -> {a['eval_rewards/margins']:.3f}")
    print(f"run directory: {cfg.output_dir} (metrics.jsonl, {summary['plot']}, model/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
