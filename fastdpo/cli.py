"""``fastdpo train``: flags and/or a YAML file (flags win), every option documented with its default."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from .train_config import TrainConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastdpo", description="fastdpo: fast, lean DPO training")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a causal LM with DPO (no arguments: the built-in demo run)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--config", help="YAML file of options (keys as below, with underscores); flags override it")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            t.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"]
                           + f" (default: {f.default})")
        else:
            base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
            t.add_argument(flag, type=base, default=None, help=f.metadata["help"] + f" (default: {f.default})")
    return p


def config_from_args(argv) -> TrainConfig:
    args = vars(_parser().parse_args(argv))
    options = {}
    path = args.pop("config")
    if path:
        import yaml
        with open(path) as fh:
            options = yaml.safe_load(fh) or {}
        unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise SystemExit(f"fastdpo train: unknown keys in --config: {sorted(unknown)}")
    args.pop("command")
    options.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**options)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(argv)
    from .trainer import train
    try:
        summary = train(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastdpo train: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":       # under torchrun, rank 0 reports
        return 0
    b, a = summary["before"], summary["after"]
    print(f"\n{summary['train_examples']} train / {summary['eval_examples']} eval pairs")
    if b:
        print(f"eval reward accuracy {b['eval/accuracy']:.3f} -> {a['eval/accuracy']:.3f}; "
              f"margin {b['eval/margin']:.3f} -> {a['eval/margin']:.3f}")
    print(f"run directory: {cfg.output_dir} (metrics.jsonl, {summary['plot']}, model/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
