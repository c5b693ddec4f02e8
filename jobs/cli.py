"""Command-line plumbing shared by the entry points: ``[config.yaml] [key=value ...] [--flags]``."""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
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


CONFIGS = Path(__file__).parent / "configs"
JOBS = {   # entry point: (default config, flags, the function that runs a loaded config)
    "generate": (CONFIGS / "digits.yaml", {"--overwrite": "output.overwrite=true"}, "pipeline.job:run_job"),
    "calibrate": (CONFIGS / "calibrate_digits.yaml", {"--overwrite": "output.overwrite=true"},
                  "pipeline.calibration:run_calibration"),
}


def entry_point(name: str, usage: str) -> tuple[Path, dict, Callable[[list[str] | None], int]]:
    """(default config, flags, ``main(argv)``) of the job entry point ``name`` (see ``JOBS``)."""
    default_config, flags, target = JOBS[name]
    module, func = target.split(":")

    def work(cfg):
        return getattr(importlib.import_module(module), func)(cfg)
    return default_config, flags, lambda argv=None: main(argv, usage, flags, job_command(default_config, work))


def job_command(default_config, work: Callable) -> Callable[[str | None, list[str], set[str]], int]:
    """The ``run`` of an entry point that loads a job config and prints what ``work(cfg)`` returns.

    Exit status 2 for bad input (config, manifest, output location, storage, solver plan: every
    ``PipelineError``), 1 when the error budget is exceeded, 0 otherwise.
    """
    def run(path: str | None, overrides: list[str], _flags: set[str]) -> int:
        from pipeline.config import load_config
        from pipeline.errors import ErrorBudgetExceeded, PipelineError

        try:
            print(work(load_config(path or default_config, overrides)))
        except ErrorBudgetExceeded as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    return run


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
