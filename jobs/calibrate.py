"""Solver-plan calibration: ``python -m jobs.calibrate [config.yaml] [key=value ...] [--overwrite]``.

The same config as ``jobs.generate`` (model, ``sampler.nfe``, guidance, size, a manifest or
template of calibration prompts and seeds) plus the ``calibrate`` section. The calibration runs on a
Ray Train ``TorchTrainer`` (``calibrate.workers`` data-parallel workers); the plan family is written to
``calibrate.out`` (default ``<output.path>/plan.json``, any fsspec URL) and a table of the
figures is printed. Use it with ``jobs.generate sampler.plan=<url>`` (and in the Serve app).
With no config file it calibrates the built-in model (``jobs/configs/calibrate_digits.yaml``).
Exit status: 0 on success, 2 for a bad config, manifest, plan location or output (or a
``calibrate.time_budget_s`` too small for any entry), 1 when the time budget ran out before some entries
(the entries done are written).
"""
import sys

from jobs.cli import entry_point

DEFAULT_CONFIG, FLAGS, main = entry_point("calibrate", __doc__)

if __name__ == "__main__":
    sys.exit(main())
