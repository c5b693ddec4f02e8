"""Bounded load test of the Serve endpoint on 127.0.0.1: throughput, latency, status codes.

    python bench/serve_load.py [--duration 8] [--out bench/results/serve_load.md] [key=value ...]

Starts a local Ray instance and the Serve app (``jobs/configs/digits.yaml`` + overrides, by
default 32x32 PNG at 10 NFE), then:

1. batching gain: closed loop at concurrency 1 and 16 (a fixed number of requests each);
   capacity = requests/s at concurrency 16;
2. open loop at 0.5x, 1x and 2x capacity: requests sent at a constant rate for
   ``--duration`` seconds (so at most rate x duration requests), each with a client timeout;
   reports requests/s completed, p50/p95/p99 latency of the 200s and the count of each status.

Everything is bounded (request counts, durations, timeouts): it stops by itself and only
talks to 127.0.0.1. Prints a Markdown table; ``--out`` also writes it to a file.
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


async def open_loop(url: str, rate: float, duration: float) -> dict:
    """Send at a constant ``rate`` for ``duration`` s, whatever the answers; wait for every answer."""
    n = max(1, int(rate * duration))
    results: list[tuple[int, float]] = []

    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S,
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=200)) as client:
        async def one(i: int):
            t0 = time.perf_counter()
            try:
                r = await client.post("/generate", json=body(i))
                results.append((r.status_code, time.perf_counter() - t0))
            except httpx.HTTPError as e:
                results.append((type(e).__name__, time.perf_counter() - t0))
        start, tasks = time.perf_counter(), []
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(10_000 + i)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    ok = [t for c, t in results if c == 200]
    pct = np.percentile(ok, [50, 95, 99]) if ok else [float("nan")] * 3
    return {"rate": rate, "sent": n, "seconds": wall, "ok_per_s": len(ok) / wall,
            "p50": pct[0], "p95": pct[1], "p99": pct[2],
            "codes": dict(collections.Counter(str(c) for c, _ in results))}


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
        f"{s.max_ongoing_requests}, max_queued_requests {s.max_queued_requests}; "
        f"{os.cpu_count()}-core {platform.machine()} CPU, load generator on the same machine "
        f"(load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}).",
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per open-loop phase")
    ap.add_argument("--single", type=int, default=30, help="requests at concurrency 1")
    ap.add_argument("--batched", type=int, default=320, help="requests at concurrency 16")
    ap.add_argument("--out", help="also write the table to this file")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = ap.parse_args(argv)
    from ray import serve

    load_before = os.getloadavg()[0]
    cfg, url = start_app(args.overrides)
    try:
        asyncio.run(closed_loop(url, 4, 16))                    # warm-up: not reported
        gain = [asyncio.run(closed_loop(url, 1, args.single)), asyncio.run(closed_loop(url, 16, args.batched))]
        capacity = gain[1]["req_per_s"]
        phases = []
        for label, factor in (("0.5x", 0.5), ("1x", 1.0), ("2x", 2.0)):
            p = asyncio.run(open_loop(url, factor * capacity, args.duration))
            phases.append({**p, "label": label})
            time.sleep(2.0)                                      # let the backlog drain
    finally:
        serve.shutdown()
    out = table(cfg, gain, phases, load_before)
    print(out)
    if args.out:
        Path(args.out).write_text(f"# Serve load test\n\n`python bench/serve_load.py {' '.join(argv or sys.argv[1:])}`\n\n"
                                  + out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
