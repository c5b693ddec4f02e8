"""Solver-plan calibration: ``python -m jobs.calibrate [config.yaml] [key=value ...] [--overwrite]``.

The same config as ``jobs.generate`` (model, ``sampler.nfe``, guidance, size, a manifest or
template of calibration prompts and seeds) plus the ``calibrate`` section. The teacher
trajectories run as a Ray Data job on the Generator actor pool; the plan is written to
``calibrate.out`` (default ``<output.path>/plan.json``, any fsspec URL) and a table of the
figures is printed. Use it with ``jobs.generate sampler.plan=<url>`` (and in the Serve app).
With no config file it calibrates the built-in model (``jobs/configs/calibrate_digits.yaml``).
Exit status: 0 on success, 2 for a bad config, manifest, plan location or output, 1 otherwise.
"""
from __future__ import annotations

import sys
from pathlib import Path

from jobs import cli

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "calibrate_digits.yaml"
FLAGS = {"--overwrite": "output.overwrite=true"}
USAGE = __doc__


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, USAGE, FLAGS, run)


def run(path: str | None, overrides: list[str], _flags: set[str]) -> int:
    from pipeline.calibration import run_calibration
    from pipeline.config import ConfigError, load_config
    from pipeline.job import OutputConflict
    from pipeline.manifest import ManifestError
    from pipeline.storage import StorageError

    try:
        cfg = load_config(path or DEFAULT_CONFIG, overrides)
        summary = run_calibration(cfg)
    except (ConfigError, ManifestError, OutputConflict, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
