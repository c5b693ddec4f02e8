"""Command-line plumbing shared by the entry points: ``[config.yaml] [key=value ...] [--flags]``."""
from __future__ import annotations

import logging
import sys
from typing import Callable


def main(argv: list[str] | None, usage: str, flags: dict[str, str | None],
         run: Callable[[str | None, list[str], set[str]], int]) -> int:
    """The entry points' shared frame: ``-h/--help`` prints ``usage``; otherwise logging is set up,
    the arguments parsed (a bad one prints the error and ``usage``: exit status 2), and
    ``run(config path, overrides, flags given)`` returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path, overrides, given = parse_args(argv, flags)
    except ValueError as e:
        print(f"error: {e}\n\n{usage}", file=sys.stderr)
        return 2
    return run(path, overrides, given)


def parse_args(argv: list[str], flags: dict[str, str | None] = {}) -> tuple[str | None, list[str], set[str]]:
    """(config path, ``key=value`` overrides, flags given); a flag mapped to an override adds it.

    Raises ``ValueError`` naming an argument that is none of these.
    """
    path, overrides, given = None, [], set()
    for a in argv:
        if a in flags:
            given.add(a)
            if flags[a]:
                overrides.append(flags[a])
        elif a.endswith((".yaml", ".yml")) and "=" not in a and path is None:
            path = a
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            raise ValueError(f"unexpected argument {a!r}")
    return path, overrides, given
