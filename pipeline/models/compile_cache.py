"""``model.compile_cache``: compile once, not once per actor.

With ``model.compile`` every actor compiles its padded batch sizes in its constructor (about a minute
per size for SD-1.5 on an H200). ``CompileCache`` shares what ``torch.compile`` produced, as one
``torch.compiler.save_cache_artifacts()`` file (inductor's FX graphs and kernels, AOTAutograd entries,
autotuning results) per model and compile settings, under a folder or fsspec URL (local disk, NFS, S3):

* an actor whose file exists loads it (``load_cache_artifacts``) before it compiles: inductor then
  finds every graph in its cache, and only Dynamo's tracing is left (seconds);
* the actors of one node take a node-local file lock while the file is missing, so one compiles and
  publishes it while the others wait, then load it; actors of other nodes and later jobs load it too;
* a plain local path (not a URL) is also made inductor's own cache folder (``<path>/inductor``,
  ``TORCHINDUCTOR_CACHE_DIR``, for the rest of the process), which holds the compiled kernels too: the
  artifacts carry Triton kernels on CUDA but not the C++ kernels of a CPU, which are rebuilt from source
  (``bench/compile_cache.py``). Actors of one machine, or of machines sharing that file system, then reuse
  whole kernels; a URL (``s3://``, ``gs://``, ``file://``) carries the artifacts only.

The file name hashes everything that changes the compiled code (model id, the ``model`` settings, the
device and its compute capability, torch and CUDA versions, batch sizes); inductor checks
each entry's own key as well, so a stale file costs a cold compile, never a wrong result.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile

import torch

from ..storage import OutputDir, write_bytes_atomic

log = logging.getLogger(__name__)
LOCK_TIMEOUT_S = 3600.0      # a node's other actors wait this long for the first one's compile, then compile too


def cache_key(model, settings, sizes: list[int]) -> str:
    """``<model tag>-<16 hex>``: the file name of this model's artifacts for these ``settings`` (the
    ``ModelConfig``), batch sizes, device, torch and CUDA versions."""
    device = model.device
    gpu = (torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)) \
        if device.type == "cuda" else None
    kept = {k: v for k, v in dataclasses.asdict(settings).items()
            if k not in ("compile_cache", "threads", "local_files_only")}
    parts = [model.model_id, kept, device.type, gpu, torch.__version__, torch.version.cuda, sorted(sizes)]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.model_id)[-60:].strip("_.-") or "model"
    return f"{tag}-{digest}"


class CompileCache:
    """A context around one actor's compile and warm-up (``with CompileCache(url, key): ...``); with
    ``url`` None it does nothing. ``loaded``: the artifacts came from the store; ``saved``: this actor
    published them. Storage errors are logged and the warm-up goes on (cold)."""

    def __init__(self, url: str | None, key: str):
        self.url, self.key, self.name = url, key, f"{key}.torchcompile"
        self.loaded = self.saved = False
        self._lock = None

    def __enter__(self) -> "CompileCache":
        if self.url is not None and "://" not in self.url:       # a local folder: inductor's own cache too
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.path.abspath(self.url), "inductor")
        if self.url is None or self._load():
            return self
        self._lock = self._acquire()
        if self._lock is not None and self._load():      # another actor of this node published it meanwhile
            self._lock.release()
            self._lock = None
        return self

    def _acquire(self):
        """The node-local lock of this key, or None after ``LOCK_TIMEOUT_S``."""
        from filelock import FileLock, Timeout
        lock = FileLock(os.path.join(tempfile.gettempdir(), f"raydiffusion-compile-{self.key}.lock"))
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            log.warning("compile cache %s: still locked after %.0f s; compiling without it", self.key, LOCK_TIMEOUT_S)
            return None
        return lock

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.url is not None and not self.loaded:
                self._save()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _load(self) -> bool:
        try:
            store = OutputDir(self.url)
            if not store.exists(self.name):
                return False
            info = torch.compiler.load_cache_artifacts(store.read_bytes(self.name))
        except Exception as e:  # noqa: BLE001 - a cache that cannot be read means a cold compile, not a failure
            log.warning("compile cache %s/%s not loaded (%s: %s); compiling cold", self.url, self.name,
                        type(e).__name__, e)
            return False
        if info is None:                # torch logged why (e.g. a corrupt file); this actor's save replaces it
            log.warning("compile cache %s/%s not loaded (unreadable); compiling cold", self.url, self.name)
            return False
        self.loaded = True
        log.info("compile cache: loaded %s/%s (%s)", self.url, self.name, info)
        return True

    def _save(self) -> None:
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            log.info("compile cache: nothing to save (backend without inductor artifacts)")
            return
        try:
            write_bytes_atomic(f"{self.url.rstrip('/')}/{self.name}", artifacts[0])
        except Exception as e:  # noqa: BLE001 - the warm-up succeeded; only sharing it failed
            log.warning("compile cache %s/%s not saved (%s: %s)", self.url, self.name, type(e).__name__, e)
            return
        self.saved = True
        log.info("compile cache: saved %s/%s (%d bytes, %s)", self.url, self.name, len(artifacts[0]), artifacts[1])
