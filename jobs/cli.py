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

    Exit status 2 for bad input (config, manifest, output location, solver plan: every other
    ``PipelineError``), 1 when the error budget is exceeded or storage stayed unavailable for its
    whole retry budget (the output is resumable), or a time budget ran out before all the work (what
    was done is written), 0 otherwise.
    """
    def run(path: str | None, overrides: list[str], _flags: set[str]) -> int:
        from pipeline.config import load_config

        quiet_typed_errors()
        try:
            print(work(load_config(path or default_config, overrides)))
        except Exception as e:  # noqa: BLE001 - typed errors become one paragraph; anything else re-raises
            return failure_status(e)
        return 0
    return run


class TypedErrorFilter(logging.Filter):
    """Drops Ray Data's own console report (a traceback) of a failure that holds one of the pipeline's
    typed errors: ``failure_status`` reports those as one paragraph. Ray Data's log file keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pipeline.errors import PipelineError, caused_by

        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]   # logged inside its `except`
        return exc is None or caused_by(exc, PipelineError) is None


def quiet_typed_errors() -> None:
    """Put ``TypedErrorFilter`` on Ray Data's console handlers (set up when ``ray.data`` is imported)."""
    import ray.data  # noqa: F401

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not any(isinstance(f, TypedErrorFilter)
                                                                  for f in handler.filters):
            handler.addFilter(TypedErrorFilter())


def failure_status(e: BaseException) -> int:
    """Print the typed error found in ``e``'s cause chain (Ray task errors and Ray Data's
    ``SystemException`` included) as one paragraph, without Ray's traceback, and return the exit
    status; re-raise ``e`` when it holds none."""
    from pipeline.errors import BudgetExhausted, ErrorBudgetExceeded, PipelineError, StorageUnavailable, caused_by

    for cls, status, advice in ((ErrorBudgetExceeded, 1, ""), (BudgetExhausted, 1, ""),
                                (StorageUnavailable, 1, " Everything committed so far stays: rerun the same "
                                                        "command to resume once the storage is back."),
                                (PipelineError, 2, "")):
        found = caused_by(e, cls)
        if found is not None:
            print(f"error: {found.subject}: {found.message}{advice}", file=sys.stderr)
            return status
    raise e


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
