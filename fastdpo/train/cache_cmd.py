"""``fastdpo cache``: list and prune the reference log-prob cache that ``fastdpo train`` fills.

Each entry is one split's reference log-probs for one (model, data, settings) fingerprint: a few bytes per pair,
so the cache grows slowly, but it never shrinks by itself. ``list`` shows each entry (what it was computed for,
size, last use); ``prune`` deletes the least recently used entries beyond ``--max-size`` and those unused for
``--older-than`` days. A deleted entry is recomputed by the next run that needs it, nothing else is lost.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fastdpo")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 500M or 2G, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = -1.0
    if not days >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of days >= 0, got {text!r}")
    return days


def add_parser(sub) -> None:
    c = sub.add_parser("cache", help="list or prune the reference log-prob cache",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    actions = c.add_subparsers(dest="action", required=True)
    for name, text in (("list", "show each cached entry"), ("prune", "delete entries")):
        a = actions.add_parser(name, help=text)
        a.add_argument("--cache-dir", default=DEFAULT_DIR, help=f"the cache (default: {DEFAULT_DIR})")
        if name == "prune":
            a.add_argument("--max-size", type=_size, metavar="SIZE",
                           help="keep the most recently used entries that fit SIZE (e.g. 500M, 2G)")
            a.add_argument("--older-than", type=_days, metavar="DAYS", help="delete entries unused for DAYS days")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def run(args) -> int:
    from . import ref_cache
    folder = os.path.abspath(os.path.expanduser(args.cache_dir))
    if not os.path.isdir(folder):
        print(f"no cache at {folder}")
        return 0
    if args.action == "list":
        found = ref_cache.entries(folder)
        for path, size, used, about in found:
            what = ", ".join(f"{k} {v}" for k, v in about.items()) or "(written before fastdpo recorded it)"
            print(f"{os.path.basename(path)}  {_human(size):>9}  used {time.strftime('%F %T', time.localtime(used))}"
                  f"  {what}")
        print(f"{len(found)} entries, {_human(sum(e[1] for e in found))} in {folder}")
        return 0
    if args.max_size is None and args.older_than is None:
        print("fastdpo cache prune: error: give --max-size and/or --older-than", file=sys.stderr)
        return 2
    removed = ref_cache.prune(folder, max_bytes=args.max_size, older_than_days=args.older_than)
    left = ref_cache.entries(folder)
    print(f"removed {len(removed)} entries; {len(left)} left, {_human(sum(e[1] for e in left))} in {folder}")
    return 0
