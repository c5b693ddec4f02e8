"""Ray Serve endpoint: the batch job's ``Generator`` behind HTTP (``schema``, ``admission``, ``engine``, ``app``).

    client -> Serve HTTP proxy (127.0.0.1)
           -> Router replica (FastAPI ingress; no model, no CPU reserved; takes every request)
              GET /healthz, /readyz, /v1/models: from the state it keeps (the generator's status,
              polled every serve.status_period_s), never behind a generation
              POST /generate: body size limit (413) -> strict JSON (no NaN/Infinity, no duplicate
              keys) -> GenerateRequest (request.RequestFields, strict, no unknown fields) -> serve
              limits -> request.Resolver (the batch job's own defaults, checks, sampler resolution,
              keys and seeds) -> resolved requests (rows)
              -> admission (admission.py): 503 + Retry-After at once when the queue is full or the
              work ahead, at the measured service rate, would make it miss its deadline
           -> ImageGenerator replica (DeploymentHandle): a request that can no longer finish in time
              is dropped before the model -> @serve.batch generate_batch(jobs) (max_batch_size,
              batch_wait_timeout_s) -> one worker thread: Generator(table) -> encoded images + the
              batch job's sidecars

A request is turned into exactly the rows a one-line manifest would give the batch job, and
the rows go through the same ``Generator``, so the endpoint returns the batch job's bytes for
the same prompt/seed/sampler/nfe/guidance/size/format. A request without a seed gets a random
one (0..2**31-1), returned in its metadata. Every model evaluation is a heartbeat: the
replica's ``check_health`` fails when a generation makes no progress for
``serve.stall_timeout_s``; a batch that cannot finish before its requests' deadline is
cancelled at the next model evaluation, and no request is answered 200 after
``serve.request_timeout_s`` (408 instead).
"""
from ..config import ServeConfig, ServeJobConfig, load_serve_config
from .admission import Admission, Decision
from .app import (
           DEFAULT_CONFIG,
           ImageGenerator,
           Router,
           app_from_config,
           build_app,
           deployment_options,
           http_options,
           image_response,
           router_options,
)
from .engine import GenerationEngine, Job, JobResult, Progress, ServiceRate, expected_calls, job_work
from .schema import GenerateRequest, InvalidRequest, check_limits, negotiate, parse_json_strict

__all__ = ["ServeConfig", "ServeJobConfig", "load_serve_config", "Admission", "Decision", "DEFAULT_CONFIG",
           "ImageGenerator", "Router", "app_from_config", "build_app", "deployment_options", "http_options",
           "image_response", "router_options", "GenerationEngine", "Job", "JobResult", "Progress", "ServiceRate",
           "expected_calls", "job_work", "GenerateRequest", "InvalidRequest", "check_limits", "negotiate",
           "parse_json_strict"]
