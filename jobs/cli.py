"""Command-line plumbing shared by the entry points: ``[config.yaml] [key=value ...] [--flags]``."""
from __future__ import annotations

import logging


def wants_help(argv: list[str], usage: str) -> bool:
    """Print ``usage`` for -h/--help; otherwise set up logging. True when help was shown."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return True
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return False


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
