"""Configuration schemas and loading: the only module that imports omegaconf.

``load_config(path, overrides)`` merges structured defaults, an optional YAML file and a
``key=value`` dotlist, and returns plain dataclass objects, so no omegaconf object ever reaches a
Ray actor. Each section validates its own values in its ``check()`` (messages name the key, e.g.
``sampler.nfe``), next to the fields it documents; ``JobConfig.check()`` adds the checks that span
sections and need only the model and sampler layers (a solver plan made for another model).
What needs the request layer (a search against the default sampler) is checked when the driver
builds its resolver (``pipeline.request.resolver_for``), also before Ray starts.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError, ParameterError, PlanError
from .models import MODEL_KINDS, model_class
from .models.savings import check_savings
from .samplers import PLAN, SAMPLERS, PlanFamily, check_method
from .samplers.plan import GUIDANCE_RULES
from .samplers.planned import BASES as PLAN_BASES
from .schedules import GRIDS, MODEL_TIME_GRIDS

log = logging.getLogger(__name__)

IMAGE_FORMATS = {"png": "png", "jpeg": "jpg", "webp": "webp"}     # output.image_format -> file extension


class Section:
    """A config section: ``check()`` validates its own values, naming ``<section>.<key>``."""
    section: ClassVar[str] = ""

    def require(self, ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{self.section}.{key}" if self.section else key, msg)

    def positive(self, *keys: str, strict: bool = True) -> None:
        """Each of ``keys`` must be > 0 (``strict``) or >= 0."""
        for k in keys:
            v = getattr(self, k)
            self.require(v is None or (v > 0 if strict else v >= 0), k, f"must be {'>' if strict else '>='} 0, got {v}")

    def check(self) -> None:
        """Raise ``ConfigError`` naming the key of the first invalid value."""


@dataclass
class ModelConfig(Section):
    section: ClassVar[str] = "model"
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
    guidance_interval: Optional[List[float]] = None   # [lo, hi] in sigma: guidance only there, one model row elsewhere
    # a hook around the model: "module:attribute" of a callable (cfg, **hook_options) -> object with
    # wrap(model_fn, requests) and optionally warm_up(); drills: pipeline.faults:FaultDrill (README, Reliability),
    # pipeline.faults:LatencyProxy (a fixed-latency stand-in for a GPU model, bench/scale.py --proxy-latency-ms)
    hook: Optional[str] = None
    hook_options: Dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        self.require(self.kind in MODEL_KINDS, "kind", f"unknown model kind {self.kind!r}; allowed: {sorted(MODEL_KINDS)}")
        self.require(self.kind != "diffusers" or bool(self.path), "path",
                     "set a diffusers pipeline folder or hub id for model.kind=diffusers")
        if self.kind == "diffusers":      # a missing folder / unsupported pipeline fails here (config files only)
            model_class(self)
        d = self.device
        self.require(d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()), "device",
                     f"{d!r} is not auto, cpu, cuda or cuda:N")
        self.require(self.dtype in ("float32", "float16", "bfloat16"), "dtype",
                     f"{self.dtype!r} is not float32, float16 or bfloat16")
        self.positive("threads", "max_sequence_length")
        self.require(self.hook is None or ":" in self.hook, "hook",
                     f"expected 'module:attribute', got {self.hook!r}")
        gi = self.guidance_interval
        self.require(gi is None or (len(gi) == 2 and 0 <= gi[0] <= gi[1]), "guidance_interval",
                     f"expected [lo, hi] with 0 <= lo <= hi (sigma), got {gi}")

    def check_cuda(self, joining_a_cluster: bool) -> None:
        """CUDA must exist here when the job will start a local instance (joining a cluster, or inside
        one, the GPUs are the workers', which this process cannot see); so must FP8 (``quantize``),
        which ``check_savings`` checks with ``cache``."""
        check_savings(self, local=not joining_a_cluster)
        d = self.device
        if d.startswith("cuda") and not joining_a_cluster:
            import ray
            import torch
            self.require(ray.is_initialized() or torch.cuda.is_available(), "device",
                         f"{d!r}, but this machine has no CUDA device (torch.cuda.is_available() is False): use "
                         "auto or cpu, install a CUDA build of torch, or join a cluster with GPUs (ray.address)")


@dataclass
class SamplerConfig(Section):
    """The default sampler of rows that do not name one."""
    section: ClassVar[str] = "sampler"
    method: str = "auto"             # a method, auto (the plan where a row fits it, else the auto rule) or plan
    nfe: int = 10                    # default model-evaluation budget per image
    schedule: Optional[str] = None   # sigma grid; None = the method's default (auto: the rule's)
    options: Dict[str, Any] = field(default_factory=dict)  # the method's options (e.g. eta), for rows using it
    plan: Optional[str] = None       # a solver plan (path, URL or builtin:NAME): what auto uses where it fits

    def check(self) -> None:
        self.require(self.method in SAMPLERS or self.method in ("auto", PLAN), "method",
                     f"unknown sampler {self.method!r}; allowed: {sorted(SAMPLERS)}, 'auto' or 'plan'")
        self.require(self.schedule is None or self.schedule in GRIDS, "schedule",
                     f"unknown grid {self.schedule!r}; allowed: {sorted(GRIDS)}")
        self.require(self.nfe >= 1, "nfe", f"must be >= 1, got {self.nfe}")
        self.require(self.method != PLAN or self.plan is not None, "method", "'plan' needs sampler.plan (a plan file)")
        self.require(not self.options or self.method not in ("auto", PLAN), "options",
                     f"options belong to a concrete sampler.method; {self.method!r} picks the method per row")
        self.require(self.plan is None or self.schedule is None, "schedule", "a solver plan (sampler.plan) has its own grid")
        if self.method in SAMPLERS:
            options = dict(self.options)
            try:
                check_method(self.method, self.nfe, self.schedule, options, "zero", options.pop("schedule_options", None))
            except ParameterError as e:
                key = e.name if e.name in ("schedule", "nfe") else "options"
                self.require(False, key, e.message if key == "options" else f"{self.method!r}: {e}")


@dataclass
class SearchConfig(Section):
    """Inference-time search (``pipeline.search``): the default of rows that do not set ``search``.
    Checked against the default sampler by ``pipeline.request.resolver_for`` (the search layer)."""
    section: ClassVar[str] = "search"
    method: str = "none"             # none | best_of_n | fk | fk_log | svdd
    particles: int = 4               # candidates per image: each image costs nfe x particles model calls
    reward: Optional[str] = None     # digits | clip | "module:function"
    reward_options: Dict[str, Any] = field(default_factory=dict)   # e.g. clip: {path: a CLIP folder}
    options: Dict[str, Any] = field(default_factory=dict)          # potential, lambda, resample_every, ...

    def check(self) -> None:
        self.require(self.particles >= 1, "particles", f"must be >= 1, got {self.particles}")


NEST_ALIASES = {"true": "always", "false": "never"}     # calibrate.nest was a bool before nesting on a rise


@dataclass
class CalibrateConfig(Section):
    """``python -m jobs.calibrate``: fit a solver plan family for the job's model (``pipeline.calibration``)."""
    section: ClassVar[str] = "calibrate"
    out: Optional[str] = None        # where the plan family goes (path or URL); default <output.path>/plan.json
    guidance_scales: Optional[List[float]] = None   # an entry per scale; None: [defaults.guidance_scale]
    sizes: Optional[List[List[int]]] = None         # an entry per [height, width]; None: [[defaults.height, defaults.width]]
    nfes: Optional[List[int]] = None                # an entry per nfe; None: [sampler.nfe]
    guidance_rule: str = "exact"     # a row between calibrated scales: exact (runs auto) | nearest (the nearest entry)
    holdout: float = 0.2             # share of the rows held out for the acceptance gate alone
    validation: float = 0.2          # share of the rows that pick the refinement iterate and the base
    calibrators: List[str] = field(default_factory=lambda: ["dp", "grad"])
    bases: List[str] = field(default_factory=lambda: list(PLAN_BASES))   # dpmpp_2m, dpmpp_3m, unipc
    teacher_nfe: int = 120           # model calls per teacher trajectory
    candidates: int = 40             # candidate levels on the teacher trajectory (DP)
    dp_samples: int = 64             # rows the DP follows
    iterations: int = 300            # gradient steps per base (at most)
    batch_size: int = 32             # rows per gradient step
    lr: float = 0.01
    time_budget_s: Optional[float] = None   # wall-time cap for the whole calibration (all entries)
    seed: int = 0
    nest: str = "rise"               # never | rise | always: an entry's candidates include its family's plan at the next
                                     # lower nfe with steps inserted (rise: only where no other candidate beats that plan)
    workers: Optional[int] = None    # Ray Train workers (data parallel); None: every CPU (or GPU) of the cluster
    storage_path: Optional[str] = None      # Ray Train's run folder (shared storage on a cluster); default: next to out

    def check(self) -> None:
        self.require(0 < self.holdout < 1 and 0 < self.validation < 1 and self.holdout + self.validation < 1,
                     "holdout", f"calibrate.holdout and calibrate.validation must be in (0, 1) and sum below 1, got "
                                f"{self.holdout} and {self.validation}")
        self.require(bool(self.calibrators) and set(self.calibrators) <= {"dp", "grad"}, "calibrators",
                     f"expected a non-empty subset of ['dp', 'grad'], got {list(self.calibrators)}")
        self.require(bool(self.bases) and set(self.bases) <= set(PLAN_BASES), "bases",
                     f"expected a non-empty subset of {list(PLAN_BASES)}, got {list(self.bases)}")
        for key in ("teacher_nfe", "candidates", "dp_samples", "batch_size"):
            self.require(getattr(self, key) >= 2, key, f"must be >= 2, got {getattr(self, key)}")
        self.require(self.iterations >= 0, "iterations", f"must be >= 0, got {self.iterations}")
        self.positive("lr", "time_budget_s", "workers")
        self.nest = NEST_ALIASES.get(str(self.nest).lower(), str(self.nest))
        self.require(self.nest in ("never", "rise", "always"), "nest",
                     f"expected never, rise or always (true: always, false: never), got {self.nest!r}")
        for key in ("guidance_scales", "sizes", "nfes"):
            self.require(getattr(self, key) is None or len(getattr(self, key)) > 0, key,
                         "an empty list calibrates nothing: give at least one value, or leave it unset (null) "
                         "for the job's default")
            values = [tuple(v) if isinstance(v, (list, tuple)) else v for v in getattr(self, key) or []]
            twice = dict.fromkeys(str(v) for i, v in enumerate(values) if v in values[:i])
            self.require(not twice, key, f"lists {', '.join(twice)} more than once: a family holds one entry per "
                                         "(nfe, guidance scale, size)")
        self.require(all(g >= 0 for g in self.guidance_scales or []), "guidance_scales", "must be >= 0")
        self.require(all(len(s) == 2 and min(s) > 0 for s in self.sizes or []), "sizes",
                     f"expected [height, width] pairs of positive sizes, got {self.sizes}")
        self.require(all(n >= 2 for n in self.nfes or []), "nfes", f"a solver plan needs nfe >= 2, got {self.nfes}")
        self.require(self.guidance_rule in GUIDANCE_RULES, "guidance_rule",
                     f"expected one of {list(GUIDANCE_RULES)}, got {self.guidance_rule!r}")


@dataclass
class DefaultsConfig(Section):
    """Values for rows that leave a field out."""
    section: ClassVar[str] = "defaults"
    guidance_scale: float = 2.0
    height: int = 32
    width: int = 32
    negative_prompt: str = ""

    def check(self) -> None:
        self.positive("height", "width")


@dataclass
class ManifestConfig(Section):
    """Where the rows come from: a file (``path``) or a template; exactly one of them."""
    section: ClassVar[str] = "manifest"
    path: Optional[str] = None       # .jsonl / .csv / .parquet
    template: Optional[str] = None   # e.g. "digit {d}": a synthetic dataset, expanded lazily
    values: Dict[str, List[Any]] = field(default_factory=dict)  # template field -> values
    count: int = 1                   # images (seeds) per template combination
    seed: int = 0                    # job-level seed: a row without a seed gets seed + row index
    limit: Optional[int] = None      # only the first N output rows (handy for trials)

    def check(self) -> None:
        self.require(self.path is not None or self.template is not None, "path",
                     "set manifest.path (a .jsonl/.csv/.parquet file) or manifest.template")
        self.require(self.path is None or self.template is None, "path",
                     f"both manifest.path ({self.path!r}) and manifest.template ({self.template!r}) are set; "
                     "keep one (on the command line, the one you set there replaces the config file's)")
        self.require(self.count >= 1, "count", f"must be >= 1, got {self.count}")
        self.positive("limit")


@dataclass
class OutputConfig(Section):
    section: ClassVar[str] = "output"
    path: str = "outputs/digits"     # local path or fsspec URL
    image_format: str = "png"        # png | jpeg | webp
    quality: int = 95                # jpeg/webp quality
    rows_per_shard: int = 1000
    webdataset: bool = True
    parquet: bool = True
    contact_sheet: int = 64          # images on the contact sheet (0 = none)
    overwrite: bool = False          # replace an output written with a different config
    storage_retry_s: float = 180.0   # retry transient storage faults this long per operation, then stop (resumable)

    def check(self) -> None:
        self.require(self.image_format in IMAGE_FORMATS, "image_format",
                     f"{self.image_format!r} is not one of {tuple(IMAGE_FORMATS)}")
        self.require(1 <= self.quality <= 100, "quality", f"must be in 1..100, got {self.quality}")
        self.positive("rows_per_shard")
        self.require(self.webdataset or self.parquet, "webdataset",
                     "at least one of output.webdataset / output.parquet must be true")
        self.positive("contact_sheet", "storage_retry_s", strict=False)


@dataclass
class RayConfig(Section):
    section: ClassVar[str] = "ray"
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

    def joins_a_cluster(self) -> bool:
        """Whether the driver joins an existing cluster (``address`` or ``RAY_ADDRESS``) rather than start one."""
        return bool(self.address or os.environ.get("RAY_ADDRESS"))

    def check(self) -> None:
        self.positive("batch_size", "actors")
        self.positive("num_cpus_per_actor", "num_gpus_per_actor", "reserve_cpus", "max_task_retries", "max_retries",
                      "progress_interval_s", strict=False)
        self.require(self.max_actor_restarts >= -1, "max_actor_restarts", f"must be >= -1, got {self.max_actor_restarts}")


@dataclass
class ErrorsConfig(Section):
    """Bad rows go to ``_errors/`` and the job goes on, within this budget."""
    section: ClassVar[str] = "errors"
    max_errors: Optional[int] = None  # stop when more rows than this have failed; if unset ...
    max_error_fraction: float = 0.01  # ... when more than this fraction of all rows have
    row_timeout_s: float = 600.0      # a micro-batch running longer becomes timeout errors
    reject_blank: bool = True         # an image with NaN/Inf or all pixels equal is an error

    def check(self) -> None:
        self.positive("max_errors", strict=False)
        self.require(0 <= self.max_error_fraction <= 1, "max_error_fraction",
                     f"must be in [0, 1], got {self.max_error_fraction}")
        self.positive("row_timeout_s")

    def budget(self, total_rows: int) -> int:
        """How many failed rows a job of ``total_rows`` may have before it stops."""
        return self.max_errors if self.max_errors is not None else int(self.max_error_fraction * total_rows)


@dataclass
class JobConfig(Section):
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

    def sections(self) -> list[Section]:
        return [getattr(self, f.name) for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Section)]

    def check(self) -> None:
        """Every section's own checks, then those spanning sections (model x sampler x plan)."""
        for s in self.sections():
            s.check()
        self.model.check_cuda(self.ray.joins_a_cluster())
        if self.model.kind == "builtin" and self.sampler.schedule in MODEL_TIME_GRIDS:
            raise ConfigError("sampler.schedule", f"grid {self.sampler.schedule!r} follows a discrete model's training "
                                                  "timesteps; the built-in (EDM) model has none: use one of "
                                                  f"{sorted(set(GRIDS) - MODEL_TIME_GRIDS)}")
        if self.sampler.plan is not None:
            check_plan(self)


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


# ---------------------------------------------------------------- loading
def merge_config(schema: type, path: str | Path | None, overrides: List[str] | None):
    """Structured defaults <- YAML file <- ``key=value`` overrides, as plain dataclasses (not checked)."""
    try:
        cfg = OmegaConf.structured(schema)
        if path is not None:
            if not Path(path).exists():
                raise ConfigError(str(path), "config file not found")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(item, "expected key=value")
        cli = OmegaConf.from_dotlist(list(overrides or []))
        cfg = OmegaConf.merge(_command_line_source_wins(cfg, cli), cli)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(key or str(path or "config"), _omegaconf_message(e)) from None


# a manifest has one source: the one set on the command line replaces the config file's other one
MANIFEST_SOURCES = {"path": ("template", "values"), "template": ("path",)}


def _command_line_source_wins(cfg, cli):
    """With ``manifest.path`` on the command line, drop the config file's ``manifest.template`` (and the
    other way round), saying so; without this a template in the file would silently win."""
    given = cli.get("manifest") or {}
    for source, others in MANIFEST_SOURCES.items():
        if given.get(source) is not None:
            for other in others:
                if other not in given and OmegaConf.select(cfg, f"manifest.{other}"):
                    log.info("manifest.%s from the command line replaces the config file's manifest.%s",
                             source, other)
                    OmegaConf.update(cfg, f"manifest.{other}", {} if other == "values" else None, merge=False)
    return cfg


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    """omegaconf's first line, with a hint where YAML read a key as a boolean (``on``, ``yes``, ``no``)."""
    msg = str(e).splitlines()[0]
    if "(bool) is incompatible" in msg:     # YAML 1.1 reads on/off/yes/no/true/false keys as booleans
        msg += "; YAML reads an unquoted on/off/yes/no/true/false as a boolean: quote the key (e.g. 'on': ...)"
    return msg


def load_config(path: str | Path | None = None, overrides: List[str] | None = None) -> JobConfig:
    """Structured defaults <- YAML file <- ``key=value`` overrides, each section checked."""
    cfg = merge_config(JobConfig, path, overrides)
    cfg.check()
    return cfg


def load_train_config(path: str | Path | None = None, overrides: List[str] | None = None) -> TrainConfig:
    return merge_config(TrainConfig, path, overrides)


# ---------------------------------------------------------------- serving (python -m jobs.serve)
@dataclass
class ServeConfig(Section):
    """The ``serve`` section: where the endpoint listens, its limits, batching and backpressure."""
    section: ClassVar[str] = "serve"
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
    request_timeout_s: float = 30.0    # per request: never a 200 after it (408)
    # admission (503 at once): the work ahead, at the measured rate, would push a request past this
    # fraction of its timeout, or the backlog (work admitted, in seconds) past max_backlog_s
    admission_headroom: float = 0.8
    max_backlog_s: float = 4.0         # bounds latency under overload and the recovery after it
    status_period_s: float = 1.0       # the router polls the generator's status (health, metrics) this often
    # health: a generation with no model evaluation for this long marks the replica unhealthy
    stall_timeout_s: float = 30.0
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 10.0
    # replicas (autoscaling when max_replicas > min_replicas); resources come from ray.*_per_actor
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0

    def check(self) -> None:
        self.positive("port", "max_body_bytes", "max_prompt_chars", "max_num_images", "max_steps", "max_side",
                      "max_pixels", "max_request_pixels", "max_batch_size", "max_ongoing_requests", "max_particles",
                      "max_request_model_calls", "request_timeout_s", "stall_timeout_s", "health_check_period_s",
                      "health_check_timeout_s", "max_replicas", "target_ongoing_requests", "status_period_s",
                      "max_backlog_s")
        self.positive("max_guidance_scale", "batch_wait_timeout_s", "retry_after_s", strict=False)
        self.require(0 < self.admission_headroom <= 1, "admission_headroom",
                     f"must be in (0, 1], got {self.admission_headroom}")
        self.require(self.port < 65536, "port", f"must be in 1..65535, got {self.port}")
        self.require(self.max_queued_requests >= -1, "max_queued_requests", "must be >= 0 (-1 = unbounded)")
        self.require(self.backpressure_status in (503, 429), "backpressure_status",
                     f"must be 503 or 429, got {self.backpressure_status}")
        self.require(0 <= self.min_replicas <= self.max_replicas, "min_replicas",
                     f"must be in 0..serve.max_replicas ({self.max_replicas}), got {self.min_replicas}")
        self.require(self.route_prefix.startswith("/"), "route_prefix", f"must start with '/', got {self.route_prefix!r}")


@dataclass
class ServeJobConfig(JobConfig):
    """The batch job's ``JobConfig`` plus the ``serve`` section (manifest/output are unused)."""
    serve: ServeConfig = field(default_factory=ServeConfig)

    def sections(self) -> list[Section]:
        return [s for s in super().sections() if not isinstance(s, ManifestConfig)]   # serving reads no manifest


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ServeJobConfig:
    """Structured defaults <- YAML <- ``key=value``, validated like the batch job's config.

    The manifest is not needed to serve, so the job checks run with a placeholder one.
    """
    cfg = merge_config(ServeJobConfig, path, overrides)
    cfg.check()
    return cfg


BUILTIN_PLANS = Path(__file__).parent / "models" / "weights"


def plan_url(url: str) -> str:
    """``builtin:NAME`` is a plan shipped with the package (``pipeline/models/weights/NAME``)."""
    return str(BUILTIN_PLANS / url.split(":", 1)[1]) if url.startswith("builtin:") else url


@functools.lru_cache(maxsize=16)
def _read_plan(url: str) -> PlanFamily:
    return PlanFamily.from_json(plan_url(url))


def load_plan(cfg: JobConfig) -> PlanFamily | None:
    """The job's solver plan family (``sampler.plan``: a family file, or a single plan's, which reads as
    a family of one), or None; ``ConfigError`` naming the key and file. Read once per process (plans
    are frozen), whichever of the config checks, the resolver and the generator asks first."""
    if cfg.sampler.plan is None:
        return None
    try:
        return _read_plan(cfg.sampler.plan)
    except PlanError as e:
        raise ConfigError("sampler.plan", str(e)) from None


def check_plan(cfg: JobConfig) -> None:
    """The plans must be made for this model and, with ``sampler.method=plan``, one for the job's default
    nfe (messages name both); with ``auto`` another default nfe only leaves the plans to the rows that fit them."""
    family = load_plan(cfg)
    model_id = model_class(cfg.model).model_id_for(cfg.model)
    if family.model.id not in (None, model_id):
        raise ConfigError("sampler.plan", f"{cfg.sampler.plan}: plan {family.entries[0].hash} was calibrated for "
                                          f"model {family.model.id!r}, this job runs {model_id!r}")
    nfes = sorted({e.nfe for e in family.entries})
    if cfg.sampler.nfe not in nfes:       # auto: rows at a plan's nfe run it, the others auto's rule
        what = f"plan {family.entries[0].hash}" if len(family.entries) == 1 else f"plan family {family.hash}"
        msg = (f"{cfg.sampler.plan}: {what} was calibrated for nfe={', '.join(map(str, nfes))}, "
               f"but sampler.nfe={cfg.sampler.nfe}")
        if cfg.sampler.method == PLAN:
            raise ConfigError("sampler.plan", msg)
        log.warning("%s: rows at nfe=%d run auto's rule instead", msg, cfg.sampler.nfe)


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-serialisable dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> JobConfig:
    """Rebuild a ``JobConfig`` from ``to_dict`` output (used inside actors)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), d))


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
