"""Configuration schemas and loading: the only module that imports omegaconf.

``load_config(path, overrides)`` merges structured defaults, an optional YAML file and a
``key=value`` dotlist, validates everything, and returns plain dataclass objects, so no
omegaconf object ever reaches a Ray actor. Unknown keys and invalid values raise
``ConfigError`` naming the key, before any Ray work starts.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError, ParameterError

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("png", "jpeg", "webp")


@dataclass
class ModelConfig:
    kind: str = "builtin"            # builtin: the packaged digits model
    path: Optional[str] = None       # weights folder or file; None = the packaged weights
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    dtype: str = "float32"           # float32 | float16 | bfloat16
    threads: Optional[int] = None    # torch intra-op threads per actor (default: the actor's CPUs)
    # diffusers only (model.kind: diffusers; path = a pipeline folder or hub id)
    variant: Optional[str] = None    # weights variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)
    local_files_only: bool = False   # never download (HF_HUB_OFFLINE=1 does the same)
    compile: bool = False            # torch.compile the network (and a diffusers VAE decoder), warmed up at start
    compile_mode: Optional[str] = None   # torch.compile mode; None: reduce-overhead (CUDA graphs) on CUDA, else default
    compile_backend: str = "inductor"    # torch.compile backend (aot_eager / eager: tracing without code generation)
    channels_last: bool = False      # channels-last memory format for the UNet and VAE
    vae_tiling: bool = False         # decode large images tile by tile
    vae_slicing: bool = False        # decode a batch one image at a time
    max_sequence_length: Optional[int] = None  # T5 tokens (SD3 256, Flux 512, PixArt 120/300 by default)
    # opt-in, training-free savings (pipeline.models.savings), each named in the model's `savings`
    quantize: Optional[str] = None   # fp8: the network's Linear layers in FP8 via torchao (CUDA capability >= 8.9)
    cache: Optional[str] = None      # deepcache: reuse a UNet's deep features between full calls (SD, SDXL, builtin)
    cache_interval: int = 3          # with cache: the full network every Nth model call, the shallow branch between
    compile_cache: Optional[str] = None  # with compile: folder or fsspec URL of torch.compile caches shared by actors


@dataclass
class SamplerConfig:
    method: str = "auto"             # default sampler for rows that do not name one: a method, auto or plan
    nfe: int = 10                    # default model-evaluation budget per image
    schedule: Optional[str] = None   # sigma grid; None = the method's default (auto: the rule's)
    options: Dict[str, Any] = field(default_factory=dict)  # the method's options (e.g. eta), for rows using it
    plan: Optional[str] = None       # a solver plan (path, URL or builtin:NAME): what auto uses where it fits


@dataclass
class SearchConfig:
    """Inference-time search (``pipeline.search``): the default of rows that do not set ``search``."""
    method: str = "none"             # none | best_of_n | fk | svdd
    particles: int = 4               # candidates per image: each image costs nfe x particles model calls
    reward: Optional[str] = None     # digits | clip | "module:function"
    reward_options: Dict[str, Any] = field(default_factory=dict)   # e.g. clip: {path: a CLIP folder}
    options: Dict[str, Any] = field(default_factory=dict)          # potential, lambda, resample_every, ...


@dataclass
class CalibrateConfig:
    """``python -m jobs.calibrate``: fit a solver plan for the job's model, nfe and guidance."""
    out: Optional[str] = None        # where the plan goes (path or URL); default <output.path>/plan.json
    holdout: float = 0.25            # fraction of the manifest's rows held out for the acceptance gate
    calibrators: List[str] = field(default_factory=lambda: ["dp", "grad"])
    teacher_nfe: int = 120           # model calls per teacher trajectory
    candidates: int = 40             # candidate levels on the teacher trajectory (DP)
    dp_samples: int = 64             # rows the DP follows
    iterations: int = 300            # gradient steps (at most)
    batch_size: int = 32             # rows per gradient step
    lr: float = 0.01
    time_budget_s: Optional[float] = None   # stop refining after this long (whole calibration)
    seed: int = 0


@dataclass
class DefaultsConfig:
    """Values for rows that leave a field out."""
    guidance_scale: float = 2.0
    height: int = 32
    width: int = 32
    negative_prompt: str = ""


@dataclass
class ManifestConfig:
    path: Optional[str] = None       # .jsonl / .csv / .parquet; ignored when template is set
    template: Optional[str] = None   # e.g. "digit {d}": a synthetic dataset, expanded lazily
    values: Dict[str, List[Any]] = field(default_factory=dict)  # template field -> values
    count: int = 1                   # images (seeds) per template combination
    seed: int = 0                    # job-level seed: a row without a seed gets seed + row index
    limit: Optional[int] = None      # only the first N output rows (handy for trials)


@dataclass
class OutputConfig:
    path: str = "outputs/digits"     # local path or fsspec URL
    image_format: str = "png"
    quality: int = 95                # jpeg/webp quality
    rows_per_shard: int = 1000
    webdataset: bool = True
    parquet: bool = True
    contact_sheet: int = 64          # images on the contact sheet (0 = none)
    overwrite: bool = False          # replace an output written with a different config


@dataclass
class RayConfig:
    address: Optional[str] = None    # None = start (or join) a local Ray instance
    num_cpus: Optional[int] = None   # for a local instance only
    num_gpus: Optional[int] = None   # for a local instance only (default: Ray detects them)
    object_store_memory: Optional[int] = None
    batch_size: int = 32             # images per model call
    actors: Optional[int] = None     # max generator actors; None = sized from cluster resources
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    reserve_cpus: float = 1.0        # CPUs left free for read/write tasks when sizing the pool
    max_actor_restarts: int = -1     # restarts of a generator actor that dies (node loss, crash, a hang); -1 = no limit
    max_task_retries: int = 8        # ... and its in-flight batches are retried on the new actor
    max_retries: int = 8             # read/write task retries (storage errors, node loss)
    progress_interval_s: float = 30.0  # log committed shards, images/s and ETA this often (0 = never)


@dataclass
class ErrorsConfig:
    """Bad rows go to ``_errors/`` and the job goes on, within this budget."""
    max_errors: Optional[int] = None  # stop when more rows than this have failed; if unset ...
    max_error_fraction: float = 0.01  # ... when more than this fraction of all rows have
    row_timeout_s: float = 600.0      # a micro-batch running longer becomes timeout errors
    reject_blank: bool = True         # an image with NaN/Inf or all pixels equal is an error
    fault_injection: bool = False     # testing: honour a `_fault` column (raise/nan/hang/oom/blank)


@dataclass
class JobConfig:
    name: str = "digits"
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    defaults: DefaultsConfig = field(default_factory=DefaultsConfig)
    manifest: ManifestConfig = field(default_factory=ManifestConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    errors: ErrorsConfig = field(default_factory=ErrorsConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)


@dataclass
class TrainConfig:
    """Training the built-in digits model (``python -m jobs.train``)."""
    out: str = "pipeline/models/weights"
    resolution: int = 16
    channels: int = 32
    emb_dim: int = 128
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    label_dropout: float = 0.1
    p_mean: float = -1.2
    p_std: float = 1.2
    ema_decay: float = 0.995
    seed: int = 0
    threads: Optional[int] = None


def merge_config(schema: type, path: str | Path | None, overrides: List[str] | None):
    try:
        cfg = OmegaConf.structured(schema)
        if path is not None:
            if not Path(path).exists():
                raise ConfigError(str(path), "config file not found")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(item, "expected key=value")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides or [])))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(key or str(path or "config"), str(e).splitlines()[0]) from None


def load_config(path: str | Path | None = None, overrides: List[str] | None = None) -> JobConfig:
    """Structured defaults <- YAML file <- ``key=value`` overrides, validated."""
    cfg = merge_config(JobConfig, path, overrides)
    validate(cfg)
    return cfg


def load_train_config(path: str | Path | None = None, overrides: List[str] | None = None) -> TrainConfig:
    return merge_config(TrainConfig, path, overrides)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(key, msg)


def _check_device(cfg: JobConfig) -> None:
    """``model.device`` names a device; CUDA must exist here when the job will start a local instance
    (joining a cluster, or inside one, the GPUs are the workers', which this process cannot see); so must
    FP8 (``model.quantize``), which ``check_savings`` checks with ``model.cache``."""
    from .models.savings import check_savings
    d = cfg.model.device
    _check(d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()), "model.device",
           f"{d!r} is not auto, cpu, cuda or cuda:N")
    check_savings(cfg.model, local=not (cfg.ray.address or os.environ.get("RAY_ADDRESS")))
    if d.startswith("cuda") and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        import ray
        import torch
        _check(ray.is_initialized() or torch.cuda.is_available(), "model.device",
               f"{d!r}, but this machine has no CUDA device (torch.cuda.is_available() is False): use auto "
               f"or cpu, install a CUDA build of torch, or join a cluster with GPUs (ray.address)")


def _check_search(cfg: JobConfig) -> None:
    """``search.*`` resolves for the job's default sampler: a known method and reward (imported, not
    loaded), valid options, and a stochastic sampler under fk/svdd (the message names both keys)."""
    from .errors import RequestError
    from .search import STEERED, STEERED_AUTO, resolve_search

    sr, s = cfg.search, cfg.sampler
    sampler, options = s.method, dict(s.options)
    if sampler == "auto" and sr.method in STEERED:
        sampler = STEERED_AUTO            # what auto resolves to under a steering method
    try:
        resolve_search(dataclasses.asdict(sr), sampler, options, "sampler.method")
    except RequestError as e:
        raise ConfigError(e.field, e.message) from None


def validate(cfg: JobConfig) -> None:
    """Value checks that the schema's types cannot express; messages name the key."""
    from .models import MODEL_KINDS
    from .samplers import SAMPLERS
    from .schedules import GRIDS

    _check(cfg.model.kind in MODEL_KINDS, "model.kind", f"unknown model kind {cfg.model.kind!r}; allowed: {sorted(MODEL_KINDS)}")
    _check(cfg.model.kind != "diffusers" or bool(cfg.model.path), "model.path",
           "set a diffusers pipeline folder or hub id for model.kind=diffusers")
    if cfg.model.kind == "diffusers":      # a missing folder / unsupported pipeline fails here (config files only)
        from .models import model_class
        model_class(cfg.model)
    _check_device(cfg)
    _check(cfg.model.dtype in ("float32", "float16", "bfloat16"), "model.dtype", f"{cfg.model.dtype!r} is not float32, float16 or bfloat16")
    s = cfg.sampler
    _check(s.method in SAMPLERS or s.method in ("auto", "plan"), "sampler.method",
           f"unknown sampler {s.method!r}; allowed: {sorted(SAMPLERS)}, 'auto' or 'plan'")
    _check(s.schedule is None or s.schedule in GRIDS, "sampler.schedule",
           f"unknown grid {s.schedule!r}; allowed: {sorted(GRIDS)}")
    _check(s.nfe >= 1, "sampler.nfe", f"must be >= 1, got {s.nfe}")
    _check(s.method != "plan" or s.plan is not None, "sampler.method", "'plan' needs sampler.plan (a plan file)")
    _check(not s.options or s.method not in ("auto", "plan"), "sampler.options",
           f"options belong to a concrete sampler.method; {s.method!r} picks the method per row")
    _check(s.plan is None or s.schedule is None, "sampler.schedule", "a solver plan (sampler.plan) has its own grid")
    if s.method in SAMPLERS:
        from .samplers import check_method
        try:
            check_method(s.method, s.nfe, s.schedule, dict(s.options))
        except ParameterError as e:
            key = f"sampler.{e.name}" if e.name in ("schedule", "nfe") else "sampler.options"
            raise ConfigError(key, e.message if e.name == "options" else f"{s.method!r}: {e}") from None
    _check_search(cfg)
    from .schedules import MODEL_TIME_GRIDS
    _check(not (cfg.model.kind == "builtin" and cfg.sampler.schedule in MODEL_TIME_GRIDS), "sampler.schedule",
           f"grid {cfg.sampler.schedule!r} follows a discrete model's training timesteps; the built-in (EDM) "
           f"model has none: use one of {sorted(set(GRIDS) - MODEL_TIME_GRIDS)}")
    _check(cfg.defaults.height > 0 and cfg.defaults.width > 0, "defaults.height/width", "must be positive")
    m = cfg.manifest
    _check(m.path is not None or m.template is not None, "manifest",
           "set manifest.path (a .jsonl/.csv/.parquet file) or manifest.template")
    _check(m.count >= 1, "manifest.count", f"must be >= 1, got {m.count}")
    _check(m.limit is None or m.limit >= 1, "manifest.limit", f"must be >= 1, got {m.limit}")
    o = cfg.output
    _check(o.image_format in IMAGE_FORMATS, "output.image_format", f"{o.image_format!r} is not one of {IMAGE_FORMATS}")
    _check(1 <= o.quality <= 100, "output.quality", f"must be in 1..100, got {o.quality}")
    _check(o.rows_per_shard >= 1, "output.rows_per_shard", f"must be >= 1, got {o.rows_per_shard}")
    _check(o.webdataset or o.parquet, "output", "at least one of output.webdataset / output.parquet must be true")
    _check(o.contact_sheet >= 0, "output.contact_sheet", "must be >= 0")
    r = cfg.ray
    _check(r.batch_size >= 1, "ray.batch_size", f"must be >= 1, got {r.batch_size}")
    _check(r.actors is None or r.actors >= 1, "ray.actors", f"must be >= 1, got {r.actors}")
    _check(r.num_cpus_per_actor >= 0 and r.num_gpus_per_actor >= 0, "ray.num_cpus_per_actor/num_gpus_per_actor",
           "must be >= 0")
    _check(r.max_actor_restarts >= -1, "ray.max_actor_restarts", f"must be >= -1, got {r.max_actor_restarts}")
    _check(r.progress_interval_s >= 0, "ray.progress_interval_s", f"must be >= 0, got {r.progress_interval_s}")
    c = cfg.calibrate
    _check(0 < c.holdout < 1, "calibrate.holdout", f"must be in (0, 1), got {c.holdout}")
    _check(bool(c.calibrators) and set(c.calibrators) <= {"dp", "grad"}, "calibrate.calibrators",
           f"expected a non-empty subset of ['dp', 'grad'], got {list(c.calibrators)}")
    for key in ("teacher_nfe", "candidates", "dp_samples", "batch_size"):
        _check(getattr(c, key) >= 2, f"calibrate.{key}", f"must be >= 2, got {getattr(c, key)}")
    _check(c.iterations >= 0 and c.lr > 0, "calibrate.iterations/lr", "iterations must be >= 0 and lr > 0")
    if s.plan is not None:
        check_plan(cfg)
    e = cfg.errors
    _check(e.max_errors is None or e.max_errors >= 0, "errors.max_errors", f"must be >= 0, got {e.max_errors}")
    _check(0 <= e.max_error_fraction <= 1, "errors.max_error_fraction", f"must be in [0, 1], got {e.max_error_fraction}")
    _check(e.row_timeout_s > 0, "errors.row_timeout_s", f"must be > 0, got {e.row_timeout_s}")


# ---------------------------------------------------------------- serving (python -m jobs.serve)
@dataclass
class ServeConfig:
    """The ``serve`` section: where the endpoint listens, its limits, batching and backpressure."""
    host: str = "127.0.0.1"            # HTTP proxy address: localhost only unless set otherwise
    port: int = 8000
    app_name: str = "raydiffusion"
    route_prefix: str = "/"
    # limits: every request costs accelerator seconds
    max_body_bytes: int = 16384
    max_prompt_chars: int = 256
    max_num_images: int = 8
    max_steps: int = 100               # nfe / steps per image
    max_side: int = 256                # height and width
    max_pixels: int = 65536            # height * width of one image
    max_request_pixels: int = 262144   # num_images * height * width
    max_guidance_scale: float = 30.0
    max_particles: int = 8             # search.particles per image
    max_request_model_calls: int = 3200   # num_images * nfe * particles of one request (413 beyond)
    # dynamic batching (@serve.batch): requests per model call and how long to wait for them
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.02
    # backpressure
    max_ongoing_requests: int = 32     # per replica (keep >= max_batch_size)
    max_queued_requests: int = 64      # waiting for a replica; beyond: rejected at once
    backpressure_status: int = 503     # 503 or 429
    retry_after_s: float = 1.0         # Retry-After on rejected requests
    request_timeout_s: float = 30.0    # per request, on the replica: 408 after it
    # health: a generation with no model evaluation for this long marks the replica unhealthy
    stall_timeout_s: float = 30.0
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 10.0
    # replicas (autoscaling when max_replicas > min_replicas); resources come from ray.*_per_actor
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0


@dataclass
class ServeJobConfig(JobConfig):
    """The batch job's ``JobConfig`` plus the ``serve`` section (manifest/output are unused)."""
    serve: ServeConfig = field(default_factory=ServeConfig)


def validate_serve(s: ServeConfig) -> None:
    """Value checks for the ``serve`` section; messages name the key."""
    positive = ("port", "max_body_bytes", "max_prompt_chars", "max_num_images", "max_steps", "max_side",
                "max_pixels", "max_request_pixels", "max_batch_size", "max_ongoing_requests", "max_particles",
                "max_request_model_calls",
                "request_timeout_s", "stall_timeout_s", "health_check_period_s", "health_check_timeout_s",
                "max_replicas", "target_ongoing_requests")
    for name in positive:
        _check(getattr(s, name) > 0, f"serve.{name}", f"must be > 0, got {getattr(s, name)}")
    _check(s.port < 65536, "serve.port", f"must be in 1..65535, got {s.port}")
    _check(s.max_guidance_scale >= 0, "serve.max_guidance_scale", f"must be >= 0, got {s.max_guidance_scale}")
    _check(s.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s", f"must be >= 0, got {s.batch_wait_timeout_s}")
    _check(s.max_queued_requests >= -1, "serve.max_queued_requests", "must be >= 0 (-1 = unbounded)")
    _check(s.backpressure_status in (503, 429), "serve.backpressure_status", f"must be 503 or 429, got {s.backpressure_status}")
    _check(s.retry_after_s >= 0, "serve.retry_after_s", f"must be >= 0, got {s.retry_after_s}")
    _check(0 <= s.min_replicas <= s.max_replicas, "serve.min_replicas",
           f"must be in 0..serve.max_replicas ({s.max_replicas}), got {s.min_replicas}")
    _check(s.route_prefix.startswith("/"), "serve.route_prefix", f"must start with '/', got {s.route_prefix!r}")


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ServeJobConfig:
    """Structured defaults <- YAML <- ``key=value``, validated like the batch job's config.

    The manifest is not needed to serve, so the job checks run with a placeholder one.
    """
    cfg = merge_config(ServeJobConfig, path, overrides)
    validate(dataclasses.replace(cfg, manifest=ManifestConfig(template="serve")))
    validate_serve(cfg.serve)
    return cfg


BUILTIN_PLANS = Path(__file__).parent / "models" / "weights"


def plan_url(url: str) -> str:
    """``builtin:NAME`` is a plan shipped with the package (``pipeline/models/weights/NAME``)."""
    return str(BUILTIN_PLANS / url.split(":", 1)[1]) if url.startswith("builtin:") else url


def load_plan(cfg: JobConfig):
    """The job's solver plan (``sampler.plan``), or None; ``ConfigError`` naming the key and file."""
    from .samplers import PlanError, SolverPlan

    if cfg.sampler.plan is None:
        return None
    try:
        return SolverPlan.from_json(plan_url(cfg.sampler.plan))
    except PlanError as e:
        raise ConfigError("sampler.plan", str(e)) from None


def check_plan(cfg: JobConfig) -> None:
    """The plan must be made for this model and, with ``sampler.method=plan``, for the job's default
    nfe (messages name both); with ``auto`` another default nfe only leaves the plan to the rows that fit it."""
    from .models import model_class

    plan = load_plan(cfg)
    model_id = model_class(cfg.model).model_id_for(cfg.model)
    _check(plan.model.id in (None, model_id), "sampler.plan",
           f"{cfg.sampler.plan}: plan {plan.hash} was calibrated for model {plan.model.id!r}, this job runs {model_id!r}")
    if plan.nfe != cfg.sampler.nfe:       # auto: rows at the plan's nfe run it, the others auto's rule
        msg = f"{cfg.sampler.plan}: plan {plan.hash} was calibrated for nfe={plan.nfe}, but sampler.nfe={cfg.sampler.nfe}"
        _check(cfg.sampler.method != "plan", "sampler.plan", msg)
        log.warning("%s: rows at nfe=%d run auto's rule instead", msg, cfg.sampler.nfe)


def error_budget(cfg: JobConfig, total_rows: int) -> int:
    """How many failed rows a job of ``total_rows`` may have before it stops."""
    if cfg.errors.max_errors is not None:
        return cfg.errors.max_errors
    return int(cfg.errors.max_error_fraction * total_rows)


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-serialisable dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> JobConfig:
    """Rebuild a ``JobConfig`` from ``to_dict`` output (used inside actors)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), d))


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
