"""Batch generation: ``python -m jobs.generate [config.yaml] [key=value ...] [--overwrite]``.

With no config file it runs ``jobs/configs/digits.yaml``: the built-in digits model over
the manifest shipped in ``jobs/manifests/``, on a local Ray instance, into ``outputs/digits``.
Overrides use dotted keys, e.g. ``sampler.method=euler output.path=s3://bucket/run1``.
Exit status: 0 on success, 2 for bad config/manifest/output/plan, 1 when the error budget is exceeded
or the storage stayed unreachable for output.storage_retry_s (one paragraph naming the URL; rerun to resume).
"""
import sys

from jobs.cli import entry_point

DEFAULT_CONFIG, FLAGS, main = entry_point("generate", __doc__)

if __name__ == "__main__":
    sys.exit(main())
