"""Ray Serve endpoint: the batch job's ``Generator`` behind HTTP (``schema``, ``engine``, ``app``).

    client -> Serve HTTP proxy (127.0.0.1)  -- max_queued_requests: 503/429 + Retry-After
           -> ImageService replica (FastAPI ingress; max_ongoing_requests)
              POST /generate: body size limit (413) -> strict JSON (no NaN/Infinity, no
              duplicate keys) -> GenerateRequest (request.RequestFields, strict, no unknown fields)
              -> serve limits -> request.Resolver (the batch job's own defaults, checks, sampler
              resolution, keys and seeds) -> resolved requests (rows)
           -> @serve.batch generate_batch(jobs)  (max_batch_size, batch_wait_timeout_s)
           -> one worker thread: Generator(table) -> encoded images + the batch job's sidecars

A request is turned into exactly the rows a one-line manifest would give the batch job, and
the rows go through the same ``Generator``, so the endpoint returns the batch job's bytes for
the same prompt/seed/sampler/nfe/guidance/size/format. A request without a seed gets a random
one (0..2**31-1), returned in its metadata. Every model evaluation is a heartbeat: the
replica's ``check_health`` fails when a generation makes no progress for
``serve.stall_timeout_s``, and a request past ``serve.request_timeout_s`` is answered 408 and
its generation is abandoned at the next model evaluation, so the replica moves on.
"""
from ..config import ServeConfig, ServeJobConfig, load_serve_config
from .app import (
           DEFAULT_CONFIG,
           ImageService,
           app_from_config,
           build_app,
           deployment_options,
           http_options,
           image_response,
)
from .engine import GenerationEngine, Job, JobResult, Progress
from .schema import GenerateRequest, InvalidRequest, check_limits, negotiate, parse_json_strict

__all__ = ["ServeConfig", "ServeJobConfig", "load_serve_config", "DEFAULT_CONFIG", "ImageService", "app_from_config",
           "build_app", "deployment_options", "http_options", "image_response", "GenerationEngine", "Job",
           "JobResult", "Progress", "GenerateRequest", "InvalidRequest", "check_limits", "negotiate",
           "parse_json_strict"]
