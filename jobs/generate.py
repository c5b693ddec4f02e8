"""Batch generation: ``python -m jobs.generate [config.yaml] [key=value ...] [--overwrite]``.

With no config file it runs ``jobs/configs/digits.yaml``: the built-in digits model over
the manifest shipped in ``jobs/manifests/``, on a local Ray instance, into ``outputs/digits``.
Overrides use dotted keys, e.g. ``sampler.method=euler output.path=s3://bucket/run1``.
Exit status: 0 on success, 2 for bad config/manifest/output, 1 for a failed run.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "digits.yaml"
USAGE = __doc__


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    path, overrides = None, []
    for a in argv:
        if a == "--overwrite":
            overrides.append("output.overwrite=true")
        elif a.endswith((".yaml", ".yml")) and "=" not in a and path is None:
            path = a
        elif "=" in a:
            overrides.append(a)
        else:
            raise SystemExit(f"error: unexpected argument {a!r}\n\n{USAGE}")
    return path, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.config import ConfigError, load_config
    from pipeline.job import OutputConflict, run_job
    from pipeline.manifest import ManifestError

    path, overrides = parse_args(argv)
    try:
        cfg = load_config(path or DEFAULT_CONFIG, overrides)
        summary = run_job(cfg)
    except (ConfigError, ManifestError, OutputConflict) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
