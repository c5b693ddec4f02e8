"""Bounded load test of the Serve endpoint on 127.0.0.1: throughput, latency, status codes, overload.

    python bench/serve_load.py [--duration 8] [--overload 60] [--out bench/results/serve_load.md] [key=value ...]

Starts a local Ray instance and the Serve app (``jobs/configs/digits.yaml`` + overrides, by
default 32x32 PNG at 10 NFE, serve.request_timeout_s 30), then:

1. batching gain: closed loop at concurrency 1 and 16 (a fixed number of requests each);
   capacity = requests/s at concurrency 16; unloaded latency = p50 at concurrency 1;
2. open loop at 0.5x and 1x capacity: requests sent at a constant rate for ``--duration``
   seconds (so at most rate x duration requests), each with a client timeout; reports
   requests/s completed, p50/p95/p99 latency of the 200s and the count of each status;
3. overload: open loop at 2x capacity for ``--overload`` seconds while ``GET /healthz`` is
   probed every 0.25 s, then, from the moment the load stops sending, normal requests one after
   another until one is served within 2x the unloaded latency. Checked against the targets:
   every 200 within serve.request_timeout_s, every 503 within 100 ms, every /healthz a 200
   within 100 ms, and that recovered request finished within 5 s of the load's end.

Everything is bounded (request counts, durations, timeouts): it stops by itself and only
talks to 127.0.0.1. Prints Markdown tables; ``--out`` also writes them to a file.
"""
import argparse
import asyncio
import collections
import os
import platform
import socket
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
CLIENT_TIMEOUT_S = 60.0
PROBE_EVERY_S = 0.25
FAST_S = 0.1                 # the target for a 503 and for /healthz
RECOVERY_S = 5.0             # after the load: a normal request served within 2x its unloaded latency by then


def body(i: int) -> dict:
    return {"prompt": f"digit {i % 10}", "seed": i}


async def closed_loop(url: str, concurrency: int, requests: int) -> dict:
    """``concurrency`` clients, each sending its next request when the previous one is answered."""
    latencies, codes, images = [], collections.Counter(), 0
    counter = iter(range(requests))

    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker():
            nonlocal images
            for i in counter:
                t0 = time.perf_counter()
                r = await client.post("/generate", json=body(i))
                latencies.append(time.perf_counter() - t0)
                codes[r.status_code] += 1
                images += len(r.json()["images"]) if r.status_code == 200 else 0
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": requests, "seconds": wall, "images_per_s": images / wall,
            "req_per_s": codes[200] / wall, "p50": np.percentile(latencies, 50), "codes": dict(codes)}


def open_client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=200))


async def timed(request) -> tuple[int | str, float]:
    """(status code or the client error's name, seconds) of one request coroutine."""
    t0 = time.perf_counter()
    try:
        return (await request).status_code, time.perf_counter() - t0
    except httpx.HTTPError as e:
        return type(e).__name__, time.perf_counter() - t0


async def send_open_loop(client: httpx.AsyncClient, rate: float, duration: float, first: int) -> list[asyncio.Task]:
    """Start a request every ``1 / rate`` s for ``duration`` s, whatever the answers; their tasks."""
    start, tasks = time.perf_counter(), []
    for i in range(max(1, int(rate * duration))):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(timed(client.post("/generate", json=body(first + i)))))
    return tasks


def percentiles(values: list[float], qs=(50, 95, 99)) -> list[float]:
    return list(np.percentile(values, qs)) if values else [float("nan")] * len(qs)


async def open_loop(url: str, rate: float, duration: float) -> dict:
    """Send at a constant ``rate`` for ``duration`` s, whatever the answers; wait for every answer."""
    async with open_client(url) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*await send_open_loop(client, rate, duration, 10_000))
        wall = time.perf_counter() - start
    ok = [t for c, t in results if c == 200]
    p50, p95, p99 = percentiles(ok)
    return {"rate": rate, "sent": len(results), "seconds": wall, "ok_per_s": len(ok) / wall,
            "p50": p50, "p95": p95, "p99": p99, "codes": dict(collections.Counter(str(c) for c, _ in results))}


async def probe_health(client: httpx.AsyncClient, stop: asyncio.Event) -> list[tuple[int | str, float]]:
    """``GET /healthz`` every ``PROBE_EVERY_S`` until ``stop``."""
    out = []
    while not stop.is_set():
        out.append(await timed(client.get("/healthz")))
        await asyncio.sleep(PROBE_EVERY_S)
    return out


async def recover(client: httpx.AsyncClient, unloaded_s: float, horizon_s: float = 30.0) -> list[tuple]:
    """From the end of the load: normal requests one after another (0.1 s apart) until one is a 200
    within 2x ``unloaded_s``; each as (seconds since the load's end, latency, status)."""
    t_end, out = time.perf_counter(), []
    while time.perf_counter() - t_end < horizon_s:
        sent = time.perf_counter() - t_end
        code, latency = await timed(client.post("/generate", json=body(len(out))))
        out.append((sent, latency, code))
        if code == 200 and latency <= 2 * unloaded_s:
            break
        await asyncio.sleep(0.1)
    return out


async def overload(url: str, rate: float, duration: float, unloaded_s: float) -> dict:
    """The overload phase (module docstring, 3.): answers, health probes and the recovery, raw."""
    async with open_client(url) as client:
        stop = asyncio.Event()
        prober = asyncio.create_task(probe_health(client, stop))
        start = time.perf_counter()
        tasks = await send_open_loop(client, rate, duration, 20_000)
        recovery = await recover(client, unloaded_s)
        results = await asyncio.gather(*tasks)
        stop.set()
        return {"rate": rate, "seconds": time.perf_counter() - start, "results": results, "health": await prober,
                "recovery": recovery}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(overrides: list[str]):
    import ray
    from ray import serve

    from pipeline.serve import app_from_config, http_options, load_serve_config

    cfg = load_serve_config(REPO / "jobs" / "configs" / "digits.yaml",
                            ["model.threads=2", "ray.num_cpus_per_actor=1", *overrides])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={**http_options(cfg), "host": "127.0.0.1", "port": port})
    serve.run(app_from_config(cfg), name="bench", route_prefix="/")
    return cfg, f"http://127.0.0.1:{port}"


def table(cfg, gain: list[dict], phases: list[dict], load_before: float) -> str:
    s, d = cfg.serve, cfg.defaults
    lines = [
        f"Serve load test: {d.height}x{d.width} {cfg.output.image_format}, {cfg.sampler.method} "
        f"{cfg.sampler.nfe} NFE, 1 replica ({cfg.model.threads} torch threads), max_batch_size "
        f"{s.max_batch_size}, batch_wait_timeout_s {s.batch_wait_timeout_s}, max_ongoing_requests "
        f"{s.max_ongoing_requests}, max_queued_requests {s.max_queued_requests}, request_timeout_s "
        f"{s.request_timeout_s:g}, max_backlog_s {s.max_backlog_s:g}, admission_headroom {s.admission_headroom:g}; "
        f"{os.cpu_count()}-core "
        f"{platform.machine()} CPU, load generator on the same machine (load average before/after: "
        f"{load_before:.1f}/{os.getloadavg()[0]:.1f}).",
        "",
        "| closed loop | requests | images/s | requests/s | p50 latency (s) | status codes |",
        "|---|---|---|---|---|---|",
    ]
    for g in gain:
        lines.append(f"| concurrency {g['concurrency']} | {g['requests']} | {g['images_per_s']:.1f} | "
                     f"{g['req_per_s']:.1f} | {g['p50']:.3f} | {g['codes']} |")
    lines.append(f"\nBatching gain (images/s at concurrency 16 vs 1): "
                 f"**{gain[1]['images_per_s'] / gain[0]['images_per_s']:.1f}x**\n")
    lines += ["| offered load | sent | 200s per s | p50 (s) | p95 (s) | p99 (s) | status codes |",
              "|---|---|---|---|---|---|---|"]
    for p in phases:
        lines.append(f"| {p['label']} ({p['rate']:.1f} req/s) | {p['sent']} | {p['ok_per_s']:.1f} | "
                     f"{p['p50']:.3f} | {p['p95']:.3f} | {p['p99']:.3f} | {p['codes']} |")
    return "\n".join(lines) + "\n"


def row(label: str, values: list[float], limit: float, unit: str, ok: list[bool] | None = None) -> str:
    """A table row: count, p50/p99/max, and how many are within ``limit`` (and ``ok``, where given)."""
    p50, p99, top = percentiles(values, (50, 99, 100))
    within = sum(v <= limit and (ok is None or good) for v, good in zip(values, ok or values))
    return f"| {label} | {len(values)} | {p50:.3f} | {p99:.3f} | {top:.3f} | {within} of {len(values)} within {unit} |"


def overload_table(o: dict, timeout_s: float, unloaded_s: float, duration: float, router: dict) -> str:
    """The overload phase against its targets (PASS/FAIL each)."""
    res, health, rec = o["results"], o["health"], o["recovery"]
    codes = collections.Counter(str(c) for c, _ in res)
    ok, shed = [t for c, t in res if c == 200], [t for c, t in res if c == 503]
    recovered = next(((s, t) for s, t, c in rec if c == 200 and t <= 2 * unloaded_s), None)
    checks = {
        f"every 200 within serve.request_timeout_s ({timeout_s:g} s)": bool(ok) and max(ok) <= timeout_s,
        "every 503 within 100 ms": all(t <= FAST_S for t in shed),
        "every /healthz a 200 within 100 ms": all(c == 200 and t <= FAST_S for c, t in health),
        f"after the load, a normal request served within 2x its unloaded latency ({2 * unloaded_s:.3f} s) "
        f"within {RECOVERY_S:g} s": recovered is not None and sum(recovered) <= RECOVERY_S,
    }
    after = (f"the first sent {recovered[0]:.2f} s after the load stopped, answered in {recovered[1]:.3f} s"
             if recovered else "none within 30 s")
    lines = [f"Overload: open loop at 2x capacity ({o['rate']:.1f} req/s) for {duration:g} s: {len(res)} sent, "
             f"status codes {dict(codes)}; the router's shed counts by reason, whole run: {router.get('shed')}.", "",
             "| answers | count | p50 (s) | p99 (s) | max (s) | target |", "|---|---|---|---|---|---|",
             row("200", ok, timeout_s, f"{timeout_s:g} s"), row("503 (shed, Retry-After)", shed, FAST_S, "100 ms"),
             row(f"GET /healthz every {PROBE_EVERY_S:g} s", [t for _, t in health], FAST_S, "100 ms as a 200",
                 [c == 200 for c, _ in health]),
             "", f"Recovery: {len(rec)} normal request(s) after the load; {after}.", ""]
    lines += [f"- {'PASS' if passed else 'FAIL'}: {name}" for name, passed in checks.items()]
    return "\n".join(lines) + "\n"


def run_phases(url: str, args) -> tuple[list[dict], list[dict], dict, dict]:
    """Closed loops, open loops at 0.5x and 1x, the overload at 2x; and the router's /readyz after it."""
    asyncio.run(closed_loop(url, 4, 16))                     # warm-up: not reported
    gain = [asyncio.run(closed_loop(url, 1, args.single)), asyncio.run(closed_loop(url, 16, args.batched))]
    capacity, phases = gain[1]["req_per_s"], []
    for label, factor in (("0.5x", 0.5), ("1x", 1.0)):
        phases.append({**asyncio.run(open_loop(url, factor * capacity, args.duration)), "label": label})
        time.sleep(2.0)                                      # let the backlog drain
    over = asyncio.run(overload(url, 2 * capacity, args.overload, gain[0]["p50"]))
    return gain, phases, over, httpx.get(f"{url}/readyz", timeout=10).json()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per open-loop phase at 0.5x and 1x")
    ap.add_argument("--overload", type=float, default=60.0, help="seconds of the 2x overload phase")
    ap.add_argument("--single", type=int, default=30, help="requests at concurrency 1")
    ap.add_argument("--batched", type=int, default=320, help="requests at concurrency 16")
    ap.add_argument("--out", help="also write the tables to this file")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args(argv)
    from ray import serve

    load_before = os.getloadavg()[0]
    cfg, url = start_app(args.overrides)
    try:
        gain, phases, over, router = run_phases(url, args)
    finally:
        serve.shutdown()
    out = table(cfg, gain, phases, load_before) + "\n" + overload_table(
        over, cfg.serve.request_timeout_s, gain[0]["p50"], args.overload, router)
    print(out)
    if args.out:
        Path(args.out).write_text(f"# Serve load test\n\n`python bench/serve_load.py {' '.join(argv or sys.argv[1:])}`\n\n"
                                  + out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
