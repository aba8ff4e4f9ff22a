"""Command-line checks that run before Hydra composes anything.

Hydra reports an unknown config-group option as a multi-line listing; a user typing
`method=magnitdue` gets one line naming the value and the accepted ones instead.
"""
from __future__ import annotations

import sys
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def check_overrides(argv: list[str]) -> None:
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if "." in key or "/" in key or not (CONF / key).is_dir() or key in ("hydra",):
            continue
        options = group_options(key)
        for v in value.split(","):  # multirun lists: method=a,b
            if v and v != "null" and v not in options:
                print(f"error: unknown {key} '{v}'; choose one of: {', '.join(options)}", file=sys.stderr)
                sys.exit(2)
