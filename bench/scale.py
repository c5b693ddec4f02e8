"""Scale on one box: a synthetic-template job of N images through the whole Ray pipeline.

    python bench/scale.py                          # N = 10,000 and 100,000
    python bench/scale.py --sizes 1000000          # the million-image run (hours on 2 cores)
    python bench/scale.py --sizes 10000 --write bench/results/scale.md
    python bench/scale.py --sizes 2000 --proxy-latency-ms 50 --actors 1 --batch-size 64 --skip-bare
                                                   # the duty cycle around a 50 ms-per-call model stand-in

For each N, a fresh process runs ``pipeline.job.run_job`` on a local Ray instance
(``jobs/configs/synthetic_digits.yaml``: "digit {d}" x 0..9, the built-in model, small
PNGs, few NFE) and samples, once a second, the resident memory (RSS) of the driver and of
the Ray processes it started: workers (``ray::*``: generator actors, read/write tasks) and
the Ray system (raylet, GCS, agents). Peaks are reported for the whole run and for its first
and second half: memory must stay flat as the job grows. Then a bare loop calls the same
``pipeline.worker.Generator`` on the same shards (``rows_per_shard`` rows each) in one
process, without Ray, for the overhead ratio. Processes are found through their parent links
from the driver, so other Ray instances on the machine are not counted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "synthetic_digits.yaml"
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 ** 2


# ---------------------------------------------------------------- memory sampling (/proc)
def process_table() -> dict[int, tuple[int, str, int]]:
    """``{pid: (ppid, cmdline, rss_bytes)}`` of every readable process."""
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            rss = int((d / "statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
        table[int(d.name)] = (int(stat[stat.rindex(")") + 2:].split()[1]), cmd, rss)
    return table


def tree_rss(root: int) -> tuple[int, int, int]:
    """RSS of (root, its ``ray::*`` descendants, its other descendants)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    workers = system = 0
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        _, cmd, rss = table[pid]
        if cmd.startswith("ray::"):
            workers += rss
        else:
            system += rss
        todo.extend(children.get(pid, []))
    return table.get(root, (0, "", 0))[2], workers, system


class MemorySampler(threading.Thread):
    """Samples ``tree_rss(os.getpid())`` every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 1.0):
        super().__init__(daemon=True)
        self.interval, self.samples, self._halt = interval, [], threading.Event()
        self.t0 = time.time()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.time() - self.t0, *tree_rss(os.getpid())))
            self._halt.wait(self.interval)

    def stop(self) -> dict:
        """Peaks (MiB) over the run and over each half of it."""
        self._halt.set()
        self.join()
        s = self.samples
        half = s[-1][0] / 2 if s else 0

        def peaks(part):
            return {name: round(max((x[i] for x in part), default=0) / MiB, 1)
                    for i, name in ((1, "driver"), (2, "workers"), (3, "ray_system"))}
        return {"all": peaks(s), "first_half": peaks([x for x in s if x[0] <= half]),
                "second_half": peaks([x for x in s if x[0] > half]), "samples": len(s)}


# ---------------------------------------------------------------- the two measurements
def job_config(n: int, out: str, a: argparse.Namespace, threads: int | None):
    from pipeline.config import load_config

    items = {"manifest.count": math.ceil(n / 10), "manifest.limit": n, "sampler.nfe": a.nfe,
             "defaults.height": a.px, "defaults.width": a.px, "output.rows_per_shard": a.rows_per_shard,
             "output.path": out, "output.overwrite": "true", "output.contact_sheet": 0,
             "ray.batch_size": a.batch_size, "ray.num_cpus": 2, "ray.actors": a.actors,
             "ray.num_cpus_per_actor": a.cpus_per_actor}
    if threads:
        items["model.threads"] = threads
    if a.proxy_latency_ms:
        items.update({"model.hook": "pipeline.faults:LatencyProxy", "model.hook_options.latency_ms":
                      a.proxy_latency_ms, "errors.reject_blank": "false"})
    return load_config(CONFIG, [f"{k}={v}" for k, v in items.items()])


def child_ray(n: int, a: argparse.Namespace) -> dict:
    """One Ray job of ``n`` images, with memory sampled through it."""
    import ray
    from pipeline.job import run_job

    out = str(Path(a.workdir) / f"ray-{n}")
    shutil.rmtree(out, ignore_errors=True)           # a fresh output: a leftover one would resume
    cfg = job_config(n, out, a, None)
    # Our own temp dir: a plain ray.init() would join a cluster that `ray start` recorded in
    # /tmp/ray/ray_current_cluster (another user's, on a shared machine) instead of starting one.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=a.ray_temp_dir)
    sampler = MemorySampler()
    sampler.start()
    t0 = time.time()
    summary = run_job(cfg)
    seconds = time.time() - t0
    mem = sampler.stop()
    ray.shutdown()
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    shutil.rmtree(out, ignore_errors=True)
    assert summary.generated_shards == summary.shards, "the run resumed instead of generating everything"
    return {"n": n, "images": summary.images, "seconds": seconds, "images_per_s": summary.images / seconds,
            "output_mib": size / MiB, "memory": mem, "loadavg": os.getloadavg()[1], "duty_cycle": summary.duty_cycle}


def child_bare(n: int, a: argparse.Namespace) -> dict:
    """The same Generator on the same shards, in this process, with ``a.bare_threads`` threads."""
    from pipeline.manifest import plan
    from pipeline.request import resolver_for
    from pipeline.sinks import OutputDir
    from pipeline.worker import Generator

    out = Path(a.workdir) / "bare"
    cfg = job_config(n, str(out), a, a.bare_threads)
    check = resolver_for(cfg)
    p = plan(cfg, OutputDir(str(out)), check)           # a template: nothing is staged
    gen = Generator(cfg)
    gen.images(p.read_shard(0, check).slice(0, a.batch_size))      # warm-up: first-call allocations
    t0 = time.time()
    images = sum(gen.images(p.read_shard(s, check)).num_rows for s in range(p.num_shards))
    seconds = time.time() - t0
    return {"n": images, "seconds": seconds, "images_per_s": images / seconds,
            "driver_mib": round(tree_rss(os.getpid())[0] / MiB, 1), "loadavg": os.getloadavg()[1]}


def run_child(kind: str, n: int, argv: list[str]) -> dict:
    """Run one measurement in a fresh interpreter (clean driver memory, fresh Ray instance)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, __file__, "--child", kind, "--n", str(n), *argv],
                         cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} n={n} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- report
def machine() -> str:
    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout.rstrip()
    return (f"{platform.processor() or platform.machine()}, nproc={os.cpu_count()}, "
            f"Python {platform.python_version()}\n\n```\n$ free -g\n{free}\n```")


def report(rays: list[dict], bare: dict, a: argparse.Namespace) -> str:
    rows = ["| images | wall time | images/s | model busy / actor time | driver peak RSS | workers peak RSS (sum) "
            "| Ray system peak RSS | workers: 1st half / 2nd half | output | load avg (5 min) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rays:
        m, duty = r["memory"], r.get("duty_cycle")
        rows.append(f"| {r['n']:,} | {r['seconds']:.0f} s | {r['images_per_s']:.1f} | "
                    f"{'' if duty is None else f'{duty:.3f}'} | {m['all']['driver']:.0f} MiB "
                    f"| {m['all']['workers']:.0f} MiB | {m['all']['ray_system']:.0f} MiB "
                    f"| {m['first_half']['workers']:.0f} / {m['second_half']['workers']:.0f} MiB "
                    f"| {r['output_mib']:.0f} MiB | {r['loadavg']:.1f} |")
    proxy = (f" Model: `pipeline.faults:LatencyProxy`, {a.proxy_latency_ms:g} ms per model call (GIL released), "
             "instead of the network." if a.proxy_latency_ms else "")
    if bare is None:
        return "\n".join([f"Job: `{CONFIG.relative_to(REPO)}`, {a.px}x{a.px} PNG, {a.nfe} NFE, "
                          f"rows_per_shard={a.rows_per_shard}, batch_size={a.batch_size}; {a.actors} generator "
                          f"actor(s) x {a.cpus_per_actor} CPU.{proxy}", "", *rows, "", f"Machine: {machine()}"])
    best = max(rays, key=lambda r: r["n"])
    ratio = best["images_per_s"] / bare["images_per_s"]
    return "\n".join([
        f"Job: `{CONFIG.relative_to(REPO)}` (\"digit {{d}}\" x 0..9), built-in model, {a.px}x{a.px} PNG, "
        f"{a.nfe} NFE (DPM-Solver++(2M)), guidance 2.0, rows_per_shard={a.rows_per_shard}, "
        f"batch_size={a.batch_size}; Ray: local instance with 2 CPUs, {a.actors} generator actor(s) x "
        f"{a.cpus_per_actor} CPU (one torch thread each), tar + parquet + stats written locally.",
        "", *rows, "",
        f"Bare loop (no Ray: the same `Generator` on the same {a.rows_per_shard}-row shards, one process, "
        f"{a.bare_threads} torch threads, encoding included, nothing written): {bare['n']:,} images in "
        f"{bare['seconds']:.0f} s = **{bare['images_per_s']:.1f} images/s** (driver {bare['driver_mib']:.0f} MiB, "
        f"load average {bare['loadavg']:.1f}).",
        f"Ray pipeline / bare loop at {best['n']:,} images: **{ratio:.2f}** (the Ray figure includes start-up, "
        f"scheduling, the object store and writing tars + parquet; the bare loop only generates and encodes).", "",
        f"Machine: {machine()}"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--nfe", type=int, default=4)
    ap.add_argument("--px", type=int, default=8, help="image height and width")
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=0.75)
    ap.add_argument("--bare-rows", type=int, default=5000, help="images for the bare-loop rate")
    ap.add_argument("--bare-threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/raydiffusion-scale")
    ap.add_argument("--ray-temp-dir", default="/tmp/rds-ray", help="the local Ray instance's temp dir")
    ap.add_argument("--write", help="also append the Markdown report to this file")
    ap.add_argument("--proxy-latency-ms", type=float, default=0.0,
                    help="replace the model by a stand-in whose every call takes this long (GIL released)")
    ap.add_argument("--skip-bare", action="store_true", help="no bare-loop measurement")
    ap.add_argument("--child", choices=["ray", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps((child_ray if a.child == "ray" else child_bare)(a.n, a)))
        return
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                   if k in ("nfe", "px", "rows_per_shard", "batch_size", "actors", "cpus_per_actor",
                            "bare_threads", "workdir", "ray_temp_dir", "proxy_latency_ms")]
    rays = []
    for n in a.sizes:
        rays.append(run_child("ray", n, passthrough))
        print(json.dumps(rays[-1]), flush=True)
    bare = None if a.skip_bare else run_child("bare", a.bare_rows, passthrough)
    print(json.dumps(bare), flush=True)
    text = report(rays, bare, a)
    print(text)
    if a.write:
        path = Path(a.write)
        path.parent.mkdir(parents=True, exist_ok=True)
        head = "" if path.exists() else "# Scale on one box\n\n(`bench/scale.py`; one section per run, newest last)\n"
        with path.open("a") as f:
            f.write(f"{head}\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: `python bench/scale.py "
                    + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
