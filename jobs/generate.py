"""Batch generation: ``python -m jobs.generate [config.yaml] [key=value ...] [--overwrite]``.

With no config file it runs ``jobs/configs/digits.yaml``: the built-in digits model over
the manifest shipped in ``jobs/manifests/``, on a local Ray instance, into ``outputs/digits``.
Overrides use dotted keys, e.g. ``sampler.method=euler output.path=s3://bucket/run1``.
Exit status: 0 on success, 2 for bad config/manifest/output, 1 for a failed run.
"""
from __future__ import annotations

import sys
from pathlib import Path

from jobs import cli

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "digits.yaml"
FLAGS = {"--overwrite": "output.overwrite=true"}
USAGE = __doc__


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, USAGE, FLAGS, generate)


def generate(path: str | None, overrides: list[str], _flags: set[str]) -> int:
    """Load the config, run the job, print its summary; the exit status."""
    from pipeline.config import ConfigError, load_config
    from pipeline.job import OutputConflict, run_job
    from pipeline.manifest import ManifestError
    from pipeline.sinks import ErrorBudgetExceeded
    from pipeline.storage import StorageError

    try:
        cfg = load_config(path or DEFAULT_CONFIG, overrides)
        summary = run_job(cfg)
    except (ConfigError, ManifestError, OutputConflict, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ErrorBudgetExceeded as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
