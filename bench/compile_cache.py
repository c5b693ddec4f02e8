"""Compile once, not once per actor: an actor's ``model.compile`` warm-up cold, and again in a fresh
process that loads the first one's ``model.compile_cache`` (``torch.compiler`` cache artifacts).

Each actor is a fresh Python process (as a Ray actor is) with its own empty inductor cache folder
(``TORCHINDUCTOR_CACHE_DIR``), as on another node or in a later job's new pod; only the folder named by
``model.compile_cache`` is shared. Rows of the table:

- cold: no ``model.compile_cache`` and an empty inductor cache: what a new node or pod pays today;
- the same node again: inductor's own cache folder (``/tmp/torchinductor_<user>`` by default) is shared
  by the actors of one node already, not by other nodes, pods or later jobs;
- first actor with ``model.compile_cache`` a URL: compiles and publishes its artifacts;
- next actor elsewhere (an empty inductor folder): loads them before compiling. On a CPU, inductor's
  C++ kernels are rebuilt from the cached source (they are not in the artifacts); on CUDA its Triton
  kernels are (``bundle_triton_into_fx_graph_cache``), so a GPU saves more than these rows show;
- first and next actor with ``model.compile_cache`` a local folder: also inductor's own cache folder,
  compiled kernels included.

    python bench/compile_cache.py                                   # built-in model, inductor, 4 sizes
    python bench/compile_cache.py --batch-size 1 --backend inductor   # one size: quicker
Writes ``bench/results/compile_cache.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACTOR = """
import json, sys, time, torch
from torch._dynamo.utils import counters
from pipeline.config import load_config
from pipeline.worker import Generator
t0 = time.time()
gen = Generator(load_config(None, json.loads(sys.argv[1])))
inductor = counters["inductor"]
print(json.dumps({"warmup_s": gen.warmup_s, "constructor_s": time.time() - t0,
                  "sizes": gen.padded_sizes(), "hits": inductor["fxgraph_cache_hit"],
                  "misses": inductor["fxgraph_cache_miss"]}))
"""


def actor(overrides: list[str], threads: int, inductor_dir: str | None = None) -> dict:
    """One generator actor's constructor in a fresh process, with ``inductor_dir`` as its inductor cache
    (default: an empty one of its own); adds the CPU seconds it and its compile workers spent."""
    with tempfile.TemporaryDirectory() as fresh:
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))   # the gpu-kit's too
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_dir or fresh, "PYTHONPATH": path,
               "OMP_NUM_THREADS": str(threads)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([sys.executable, "-c", ACTOR, json.dumps(overrides)], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def torch_version() -> str:
    return subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                          text=True).stdout.strip()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8, help="ray.batch_size: padded sizes b, b/2, b/4, b/8")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides (e.g. model.cache=deepcache)")
    p.add_argument("--runs", nargs="+", default=["cold", "node", "first", "next", "folder", "again"],
                   choices=["cold", "node", "first", "next", "folder", "again"], help="which actors, in order")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "compile_cache.md"))
    args = p.parse_args(argv)
    store, folder = tempfile.mkdtemp(prefix="compile-cache-"), tempfile.mkdtemp(prefix="compile-folder-")
    node = tempfile.mkdtemp(prefix="inductor-node-")
    base = ["manifest.template=digit", f"ray.batch_size={args.batch_size}", "model.compile=true",
            f"model.compile_backend={args.backend}", f"model.threads={args.threads}", *args.extra]
    url, local = base + [f"model.compile_cache=file://{store}"], base + [f"model.compile_cache={folder}"]
    plans = {"cold": ("cold: no model.compile_cache, empty inductor cache", base, node),
             "node": ("same node, no model.compile_cache (inductor's own folder)", base, node),
             "first": ("first actor, model.compile_cache=file://... (compiles, publishes)", url, None),
             "next": ("next actor elsewhere, same URL (loads the artifacts)", url, None),
             "folder": ("first actor, model.compile_cache=<local folder>", local, None),
             "again": ("next actor sharing that folder (another pod on its volume, a later job)", local, None)}
    runs = [(plans[k][0], actor(plans[k][1], args.threads, plans[k][2])) for k in args.runs]
    files = sorted(Path(store).iterdir()) or sorted(Path(folder).glob("*.torchcompile"))
    lines = ["# Compile cache: an actor's warm-up, cold vs with shared caches\n",
             f"`python bench/compile_cache.py --batch-size {args.batch_size} --backend {args.backend}"
             f"{' --extra ' + ' '.join(args.extra) if args.extra else ''}` on {platform.machine()}, "
             f"{os.cpu_count()} cores, {args.threads} threads, torch {torch_version()}, {time.strftime('%Y-%m-%d')}; "
             f"built-in model, padded sizes {runs[0][1]['sizes']}; each actor a fresh process; artifact file "
             f"{files[0].stat().st_size if files else 0} bytes.\n",
             "| actor | warm-up s (wall) | CPU s (with compile workers) | FX graph cache hits / misses |",
             "|---|---:|---:|---|"]
    lines += [f"| {name} | {r['warmup_s']:.1f} | {r['cpu_s']:.1f} | {r['hits']} / {r['misses']} |" for name, r in runs]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
