"""Online serving: ``python -m jobs.serve [config.yaml] [key=value ...] [--check]``.

Starts the Ray Serve application of ``pipeline.serve`` on a local Ray instance (or
``ray.address``) with the batch job's config: the same model, sampler and defaults, plus
the ``serve`` section (address, limits, batching, backpressure). With no config file it
uses ``jobs/configs/digits.yaml``. The HTTP proxy listens on ``serve.host:serve.port``
(127.0.0.1:8000 by default). ``--check`` validates the config, prints it and exits.
Exit status: 0 on a clean stop (Ctrl-C), 2 for a bad config or argument.
"""
import sys
import time

from jobs import cli

USAGE = __doc__


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, USAGE, {"--check": None}, start)


def start(path: str | None, overrides: list[str], flags: set[str]) -> int:
    """Load the config; print it (``--check``) or serve it; the exit status."""
    from pipeline.config import to_yaml
    from pipeline.request import resolver_for
    from pipeline.serve import DEFAULT_CONFIG, load_serve_config

    try:
        cfg = load_serve_config(path or DEFAULT_CONFIG, overrides)
        resolver_for(cfg)                    # the defaults as a whole: search x sampler x plan (no Ray, no weights)
    except ValueError as e:                  # ConfigError is one
        print(f"error: {e}\n\n{USAGE}", file=sys.stderr)
        return 2
    if "--check" in flags:
        print(to_yaml(cfg))
        return 0
    return run(cfg)


def run(cfg) -> int:
    """Start Serve with ``cfg`` and block until interrupted; shut it down cleanly."""
    from ray import serve

    from pipeline.job import ensure_ray
    from pipeline.serve import app_from_config, http_options

    ensure_ray(cfg.ray)
    serve.start(http_options=http_options(cfg))
    s = cfg.serve
    serve.run(app_from_config(cfg), name=s.app_name, route_prefix=s.route_prefix)
    print(f"serving {cfg.model.kind} model at http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}/generate "
          f"(docs: /docs, health: /healthz); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
