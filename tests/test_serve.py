"""The Serve endpoint over real HTTP on 127.0.0.1, with the built-in model (small images, low NFE).

Three applications run side by side: ``main`` (default backpressure, tightened pixel limits),
``tight`` (one request at a time, one queued, 1.5 s timeout) for overload and timeouts, and
``deadline`` (one at a time, no queue limit, 2 s timeout) where only the deadline sheds load.
"""
import asyncio
import base64
import io
import json
import math
import socket
import time
from types import SimpleNamespace

import httpx
import pyarrow.dataset as pads
import pytest
import webdataset as wds
import yaml
from PIL import Image

from conftest import REPO, job_config
from pipeline.config import ConfigError
from pipeline.serve import (Admission, GenerationEngine, Job, JobResult, Progress, app_from_config, build_app,
                            expected_calls, image_response, load_serve_config)
from pipeline.serve.app import liveness, readiness
from pipeline.serve.engine import Abandoned

pytestmark = pytest.mark.timeout(300)
SIDECAR_KEYS = {"key", "prompt", "negative_prompt", "seed", "sampler", "schedule", "sampler_options", "final", "plan",
                "nfe", "guidance_scale", "height", "width", "model_id", "row", "source_row", "search"}
BASE = ["ray.num_cpus_per_actor=0.25", "model.threads=1", "defaults.height=16", "defaults.width=16",
        "serve.max_steps=200", "serve.max_pixels=40000", "serve.max_request_pixels=100000",
        "serve.batch_wait_timeout_s=0.05", "search.reward=digits", "serve.status_period_s=0.2"]
TIGHT = ["serve.max_ongoing_requests=1", "serve.max_queued_requests=1", "serve.max_batch_size=1",
         "serve.max_steps=1000", "serve.request_timeout_s=1.5", "serve.retry_after_s=2"]
DEADLINE = ["serve.max_ongoing_requests=1", "serve.max_queued_requests=-1", "serve.max_batch_size=1",
            "serve.max_steps=1000", "serve.request_timeout_s=2", "serve.retry_after_s=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_session):
    from ray import serve

    port = free_port()
    main, tight = load_serve_config(None, BASE), load_serve_config(None, BASE + TIGHT)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_from_config(main), name="main", route_prefix="/")
    serve.run(app_from_config(tight), name="tight", route_prefix="/tight")
    serve.run(app_from_config(load_serve_config(None, BASE + DEADLINE)), name="deadline", route_prefix="/deadline")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        yield SimpleNamespace(url=url, port=port, cfg=main, tight=tight, client=client)
    serve.shutdown()


def post(client, body, path="/generate", **kw):
    return client.post(path, json=body, **kw)


def decode(entry: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(entry["image_base64"])))


def steps_taking(served, app: str, seconds: float) -> int:
    """Steps for which one request to ``app`` takes about ``seconds`` at the machine's speed now, from a timed
    30-step request: the suite shares 2 cores with whatever else runs, and fixed step counts against 1.5-2 s
    deadlines failed in CI when the box was busy."""
    t0 = time.monotonic()
    r = served.client.post(f"/{app}/generate", json={"prompt": "0", "steps": 30})
    assert r.status_code == 200, r.text
    return max(10, min(1000, int(30 * seconds / (time.monotonic() - t0))))


def generator_status(app_name: str = "main") -> dict:
    """The model replica's own status (straight from it, not the router's cached copy)."""
    from ray import serve

    return serve.get_deployment_handle("ImageGenerator", app_name=app_name).status.remote().result()


def evaluations(app_name: str = "main") -> int:
    return generator_status(app_name)["model_evaluations"]


async def concurrent_posts(url: str, bodies: list[dict], path="/generate") -> list[tuple[httpx.Response, float]]:
    """POST every body at once; each response with its latency."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async def one(body):
            t0 = time.monotonic()
            r = await client.post(path, json=body)
            return r, time.monotonic() - t0
        return await asyncio.gather(*(one(b) for b in bodies))


# ---------------------------------------------------------------- generation
def test_generate_returns_images_with_batch_job_metadata(served):
    r = post(served.client, {"prompt": "digit 7", "seed": 11, "num_images": 2, "nfe": 6, "sampler": "euler",
                             "guidance_scale": 2.5, "height": 24, "width": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    model_id = served.client.get("/v1/models").json()["models"][0]["id"]
    assert body["model_id"] == model_id and len(body["images"]) == 2
    for j, entry in enumerate(body["images"]):
        meta = entry["metadata"]
        assert set(meta) == SIDECAR_KEYS
        assert (meta["seed"], meta["sampler"], meta["nfe"], meta["guidance_scale"]) == (11 + j, "euler", 6, 2.5)
        assert meta["key"] == f"{body['request_id']}_{j}" and meta["model_id"] == model_id
        assert entry["media_type"] == "image/png"
        img = decode(entry)
        assert img.format == "PNG" and img.size == (20, 24)
    assert decode(body["images"][0]).tobytes() != decode(body["images"][1]).tobytes()


def test_search_requests_return_the_kept_particle_and_every_reward(served):
    body = {"prompt": "digit 4", "seed": 5, "nfe": 4, "search": {"method": "svdd", "particles": 3}}
    r = post(served.client, body)
    assert r.status_code == 200, r.text
    meta = r.json()["images"][0]["metadata"]
    assert meta["search"]["method"] == "svdd" and meta["sampler"] == "euler_ancestral"
    assert len(meta["search_rewards"]) == 3 and meta["search_reward"] == max(meta["search_rewards"])
    again = post(served.client, body).json()["images"][0]
    assert {**again["metadata"], "key": None} == {**meta, "key": None}                   # deterministic
    assert again["image_base64"] == r.json()["images"][0]["image_base64"]
    listed = served.client.get("/v1/models").json()["models"][0]
    assert listed["search"]["reward"] == "digits" and listed["limits"]["max_particles"] == 8


def test_raw_image_with_accept_header(served):
    r = post(served.client, {"prompt": "3", "seed": 5, "nfe": 4}, headers={"Accept": "image/webp"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(r.content)).format == "WEBP"
    meta = json.loads(r.headers["x-metadata"])
    assert meta["seed"] == 5 == int(r.headers["x-seed"]) and set(meta) == SIDECAR_KEYS
    r = post(served.client, {"prompt": "3", "num_images": 2}, headers={"Accept": "image/png"})
    assert r.status_code == 406 and r.json()["field"] == "num_images"
    r = post(served.client, {"prompt": "3", "format": "jpeg"}, headers={"Accept": "image/png"})
    assert r.status_code == 422 and r.json()["field"] == "format"


def test_missing_seed_is_random_and_reported(served):
    a, b = (post(served.client, {"prompt": "digit 2", "nfe": 4}).json()["images"][0] for _ in range(2))
    seeds = a["metadata"]["seed"], b["metadata"]["seed"]
    assert seeds[0] != seeds[1] and all(0 <= s < 2 ** 31 for s in seeds)
    again = post(served.client, {"prompt": "digit 2", "nfe": 4, "seed": seeds[0]}).json()["images"][0]
    assert again["image_base64"] == a["image_base64"]


def test_same_image_batched_or_alone(served):
    """Concurrent requests of mixed shapes, samplers and formats share batches; bytes do not change."""
    target = {"prompt": "digit 5", "seed": 1234, "nfe": 8, "sampler": "euler_ancestral", "guidance_scale": 3.0}
    others = [{"prompt": f"digit {i % 10}", "seed": i, "nfe": [8, 6][i % 2], "height": [16, 24][i % 2],
               "sampler": ["euler_ancestral", "dpmpp_2m", "ddim"][i % 3], "format": ["png", "webp"][i % 2],
               "num_images": 1 + i % 3} for i in range(11)]
    results = asyncio.run(concurrent_posts(served.url, others[:6] + [target] + others[6:]))
    assert all(r.status_code == 200 for r, _ in results), [r.text[:300] for r, _ in results if r.status_code != 200]
    assert max(r.json()["batch"]["requests"] for r, _ in results) > 1        # batching happened
    batched = results[6][0].json()
    alone = post(served.client, target).json()
    assert alone["batch"]["requests"] == 1
    assert alone["images"][0]["image_base64"] == batched["images"][0]["image_base64"]
    twice = post(served.client, target).json()
    assert twice["images"][0]["image_base64"] == alone["images"][0]["image_base64"]


def test_endpoint_matches_batch_job_bytes(served, ray_session, tmp_path, write_jsonl):
    from pipeline.job import run_job

    row = {"prompt": "digit 4", "seed": 77, "sampler": "dpmpp_2m", "nfe": 8, "guidance_scale": 3.0,
           "height": 24, "width": 24}
    run_job(job_config(tmp_path, write_jsonl([row]), **{"output.image_format": "png"}))
    [sample] = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "out" / "shards").glob("*.tar")),
                                   shardshuffle=False))
    parquet = pads.dataset(str(tmp_path / "out" / "parquet"), format="parquet").to_table()
    assert parquet["image"][0].as_py() == sample["png"]
    r = post(served.client, {**row, "format": "png"}, headers={"Accept": "image/png"})
    assert r.status_code == 200
    assert r.content == sample["png"]                        # the batch job's bytes
    meta, job_meta = json.loads(r.headers["x-metadata"]), json.loads(sample["json"])
    assert set(meta) == set(job_meta)
    assert {k: v for k, v in meta.items() if k != "key"} == {k: v for k, v in job_meta.items() if k != "key"}


# ---------------------------------------------------------------- validation
INVALID = [
    ({"prompt": "7", "colour": "red"}, 422, "colour", "unknown field"),
    ({"prompt": "7", "seed": "abc"}, 422, "seed", "integer"),
    ({"prompt": "7", "num_images": True}, 422, "num_images", "integer"),
    (b'{"prompt": "7", "guidance_scale": NaN}', 422, "guidance_scale", "finite"),
    (b'{"prompt": "7", "seed": -Infinity}', 422, "seed", "finite"),
    (b'{"prompt": "7", "seed": 1, "seed": 2}', 422, "seed", "more than once"),
    (b'{"prompt": "7",', 422, "body", "not valid JSON"),
    (b'[{"prompt": "7"}]', 422, "body", "JSON object"),
    ({"prompt": ""}, 422, "prompt", "1..256"),
    ({"prompt": "   "}, 422, "prompt", "1..256"),
    ({"prompt": "digit 7 " + "x" * 300}, 422, "prompt", "at most 256"),
    ({"prompt": "a cat"}, 422, "prompt", "digit"),
    ({"prompt": "7", "num_images": 9}, 422, "num_images", "1..8"),
    ({"prompt": "7", "num_images": 1000000}, 422, "num_images", "1..8, got 1000000"),       # the deployment's limit
    ({"prompt": "7", "steps": 5000}, 422, "steps", "1..200, got 5000"),
    ({"prompt": "7", "seed": "x" * 5000}, 422, "seed", "(5002 characters)"),               # echoed values are cut
    ({"prompt": "7", "steps": 201}, 422, "steps", "1..200"),
    ({"prompt": "7", "nfe": 0}, 422, "nfe", "greater than or equal to 1"),
    ({"prompt": "7", "nfe": 10, "steps": 12}, 422, "nfe", "disagree"),
    ({"prompt": "7", "height": 300}, 422, "height", "1..256"),
    ({"prompt": "7", "height": 256, "width": 200}, 422, "height", "40000 pixels"),
    ({"prompt": "7", "num_images": 4, "height": 160, "width": 160}, 422, "num_images", "100000 pixels"),
    ({"prompt": "7", "width": 4}, 422, "width", "8..512"),
    ({"prompt": "7", "guidance_scale": 31}, 422, "guidance_scale", "0.0..30.0"),
    ({"prompt": "7", "sampler": "heun9"}, 422, "sampler", "allowed"),
    ({"prompt": "7", "format": "gif"}, 422, "format", "'png'"),
    (b'{"prompt": "7", "negative_prompt": "' + b"x" * 17000 + b'"}', 413, "body", "16384 bytes"),
    ({"prompt": "7", "search": {"method": "fk", "particles": 9}}, 422, "search.particles", "1..8"),
    ({"prompt": "7", "nfe": 200, "num_images": 8, "search": {"method": "best_of_n", "particles": 3}}, 413,
     "search.particles", "8*200*3=4800"),
    ({"prompt": "7", "search": {"method": "fk", "reward": "os:system"}}, 422, "search.reward", "set by the deployment"),
    ({"prompt": "7", "sampler": "dpmpp_2m", "search": {"method": "svdd"}}, 422, "search.method", "dpmpp_2m_sde"),
    ({"prompt": "7", "search": {"method": "beam"}}, 422, "search.method", "allowed"),
    ({"prompt": "7", "search": {"particles": "4"}}, 422, "search.particles", "valid integer"),
]


@pytest.mark.parametrize("body,status,field,text", INVALID, ids=[f"{c[2]}-{c[1]}-{i}" for i, c in enumerate(INVALID)])
def test_invalid_requests_name_the_field_without_touching_the_model(served, body, status, field, text):
    before = evaluations()
    if isinstance(body, bytes):
        r = served.client.post("/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = post(served.client, body)
    assert r.status_code == status, r.text
    detail = r.json()
    assert detail["field"] == field and field in detail["detail"] and text in detail["detail"], detail
    assert evaluations() == before


def test_streamed_body_over_limit_is_413(served):
    def chunks():
        for _ in range(40):
            yield b" " * 1024            # no Content-Length: the limit applies while reading
    r = served.client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"


# ---------------------------------------------------------------- metadata endpoints
def test_models_openapi_and_health(served):
    m = served.client.get("/v1/models").json()["models"][0]
    assert m["loaded"] and m["id"].startswith("builtin-digits-")
    assert m["defaults"]["sampler"] == served.cfg.sampler.method and m["defaults"]["height"] == 16
    assert m["limits"]["max_steps"] == 200 and m["limits"]["max_num_images"] == served.cfg.serve.max_num_images
    assert "euler" in m["samplers"] and m["formats"] == ["png", "jpeg", "webp"]
    spec = served.client.get("/openapi.json").json()
    assert {"/generate", "/healthz", "/readyz", "/v1/models"} <= set(spec["paths"])
    schema = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["additionalProperties"] is False and {"prompt", "seed", "steps", "format"} <= set(schema["properties"])
    h = served.client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    r = served.client.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] and r.json()["generator"]["model_evaluations"] > 0


def test_generation_does_not_block_the_event_loop(served):
    """/healthz answers while a long generation runs in the worker thread."""
    async def scenario():
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            gen = asyncio.create_task(client.post("/generate", json={"prompt": "1", "nfe": 200, "num_images": 2}))
            busy = []
            for _ in range(100):
                t0 = time.monotonic()
                h = (await client.get("/healthz")).json()
                if h["busy"] and not gen.done():
                    busy.append(time.monotonic() - t0)
                if len(busy) >= 3 or gen.done():
                    break
                await asyncio.sleep(0.05)
            return busy, await gen
    busy, r = asyncio.run(scenario())
    assert r.status_code == 200 and len(busy) >= 1 and max(busy) < 1.0, busy


# ---------------------------------------------------------------- backpressure and timeouts
def test_overload_is_rejected_quickly_with_retry_after(served):
    steps = steps_taking(served, "tight", 0.3)
    bodies = [{"prompt": str(i % 10), "seed": i, "steps": steps} for i in range(10)]
    results = asyncio.run(concurrent_posts(served.url, bodies, path="/tight/generate"))
    codes = [r.status_code for r, _ in results]
    rejected = [(r, t) for r, t in results if r.status_code == 503]
    assert set(codes) <= {200, 408, 503}, codes                  # never a 500 or a hang
    assert len(rejected) >= 5 and 200 in codes, codes           # 1 running + 1 queued: the rest shed
    assert all(int(r.headers["retry-after"]) >= 2 for r, _ in rejected)      # serve.retry_after_s at least
    assert {r.json()["reason"] for r, _ in rejected} <= {"queue_full", "deadline"}
    assert max(t for _, t in rejected) < 1.0
    assert served.client.post("/tight/generate", json={"prompt": "4", "nfe": 4}).status_code == 200


def test_health_answers_at_once_while_the_generator_is_saturated(served):
    """Health and metadata never enter the generation queue: the issue's probe of 100 heavy requests made
    /healthz answer 503 (Serve's backpressure) and would have had a busy replica restarted."""
    steps = steps_taking(served, "tight", 0.5)

    async def scenario():
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            heavy = [asyncio.create_task(client.post("/tight/generate", json={"prompt": str(i % 10), "steps": steps}))
                     for i in range(20)]
            probes, paths = [], ("/tight/readyz", "/tight/healthz", "/tight/v1/models")
            while not all(t.done() for t in heavy) and (len(probes) < 30 or not busy_readyz(probes)):
                path = paths[len(probes) % 3]        # one probe at a time, readiness first, while work runs
                t0 = time.monotonic()
                r = await client.get(path)
                probes.append((path, r.status_code, time.monotonic() - t0, r.json()))
                await asyncio.sleep(0.02)
            return probes, await asyncio.gather(*heavy)

    def busy_readyz(probes):
        return [b for path, _, _, b in probes if path.endswith("readyz") and b["busy"] and b["in_flight"] >= 1]
    probes, answers = asyncio.run(scenario())
    assert probes and all(code == 200 for _, code, _, _ in probes), [p[:3] for p in probes if p[1] != 200]
    assert max(t for _, _, t, _ in probes) < 0.5, sorted(t for _, _, t, _ in probes)[-3:]
    ready = [b for path, _, _, b in probes if path.endswith("readyz")]
    assert busy_readyz(probes) and all(b["ready"] for b in ready), (steps, len(probes), ready[:3])
    codes = [r.status_code for r in answers]
    assert 503 in codes and set(codes) <= {200, 408, 503}, codes          # shed at once, never queued to death


def test_a_request_the_queue_would_make_late_is_refused_at_once(served):
    """``deadline`` has no queue limit: the work ahead at the measured rate decides, at once, with
    Retry-After; an admitted request is never answered 200 after serve.request_timeout_s (2 s)."""
    alone = 0.25
    steps = steps_taking(served, "deadline", alone)  # also gives the replica its measured rate
    n = int(2.0 / alone) + 8                         # several times what fits in 0.8 x 2 s
    bodies = [{"prompt": str(i % 10), "seed": i, "steps": steps} for i in range(n)]
    results = asyncio.run(concurrent_posts(served.url, bodies, path="/deadline/generate"))
    codes = [r.status_code for r, _ in results]
    ok = [t for r, t in results if r.status_code == 200]
    shed = [(r, t) for r, t in results if r.status_code == 503]
    assert set(codes) <= {200, 408, 503} and ok, codes
    assert max(ok) < 2.0 + 0.25, sorted(ok)[-3:]       # + the proxy's share, outside the router's clock
    assert len(shed) >= 4 and {r.json()["reason"] for r, _ in shed} == {"deadline"}, codes
    assert max(t for _, t in shed) < 0.5 and all(int(r.headers["retry-after"]) >= 1 for r, _ in shed)
    assert served.client.get("/deadline/readyz").json()["shed"]["deadline"] >= len(shed)


def test_queue_depth_shed_count_and_latency_are_exported_as_ray_metrics(served):
    import ray

    assert served.client.post("/tight/generate", json={"prompt": "3", "nfe": 4}).status_code == 200
    asyncio.run(concurrent_posts(served.url, [{"prompt": "1", "steps": 120}] * 8, path="/tight/generate"))
    port = ray._private.worker._global_node.metrics_export_port
    wanted = {"ray_raydiffusion_shed", "ray_raydiffusion_requests", "ray_raydiffusion_latency_s_bucket",
              "ray_raydiffusion_latency_quantile_s", "ray_raydiffusion_queue_depth", "ray_raydiffusion_in_flight",
              "ray_raydiffusion_generator_queued"}
    def tight_shed(lines):
        return [ln for ln in lines if ln.startswith("ray_raydiffusion_shed") and 'application="tight"' in ln
                and 'reason="' in ln and float(ln.rsplit(" ", 1)[1]) >= 1]

    found, lines, deadline = set(), [], time.monotonic() + 90
    while (found != wanted or not tight_shed(lines)) and time.monotonic() < deadline:   # metrics export lags
        time.sleep(2)
        lines = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
        found = {w for w in wanted if any(ln.startswith(w) for ln in lines)}
    assert found == wanted, wanted - found
    assert tight_shed(lines), [ln for ln in lines if "raydiffusion_shed" in ln]     # counted by reason


def test_request_timeout_is_408_and_the_replica_moves_on(served):
    t0 = time.monotonic()
    r = served.client.post("/tight/generate", json={"prompt": "8", "steps": 1000, "num_images": 2})
    assert r.status_code == 408 and "request_timeout_s" in r.json()["detail"]
    # dropped before it started (the replica's rate says it cannot make it) or cancelled mid-generation
    # once it falls behind: either way well before the 1.5 s deadline would have passed twice
    assert time.monotonic() - t0 < 3.0
    time.sleep(0.3)
    n = evaluations("tight")
    time.sleep(0.5)
    assert evaluations("tight") == n and not generator_status("tight")["busy"]
    t1 = time.monotonic()
    r = served.client.post("/tight/generate", json={"prompt": "8", "nfe": 6})
    assert r.status_code == 200 and time.monotonic() - t1 < 1.5


def test_health_check_notices_a_stalled_generator():
    now = [100.0]
    p = Progress(stall_timeout_s=5.0, clock=lambda: now[0])
    p.check()                                  # idle: healthy however long ago the last image was
    now[0] += 60
    p.check()
    model_fn = p.wrap(lambda x: x * 2)
    p.start(deadline=now[0] + 100)
    now[0] += 4
    assert model_fn(3) == 6                    # progress: a heartbeat
    now[0] += 4
    p.check()                                  # 4 s since the last evaluation: fine
    now[0] += 2
    with pytest.raises(RuntimeError, match="stalled"):
        p.check()                              # 6 s without an evaluation while busy: unhealthy
    p.stop()
    p.check()


def test_failed_rows_are_a_500_naming_each_row():
    """The Generator's per-row ``error`` column (NaN sample, blank image, ...) fails the request."""
    rows = [{"key": "r_0", "image": b"png", "error": None, "json": "{}"},
            {"key": "r_1", "image": None, "error": "the sample has NaN/Inf values", "json": "{}"}]
    r = image_response(JobResult(rows=rows, batch_requests=1, batch_images=2), "png", False, "m", "r")
    assert r.status_code == 500
    assert json.loads(r.body)["errors"] == [{"key": "r_1", "error": "the sample has NaN/Inf values"}]


# ---------------------------------------------------------------- configuration and entry points
def test_jobs_serve_config_errors_exit_2(capsys):
    from jobs.serve import main

    for args, key in ([["serve.max_steps=0"], "serve.max_steps"], [["serve.nonsense=1"], "serve.nonsense"],
                      [["serve.backpressure_status=500"], "serve.backpressure_status"],
                      [["serve.admission_headroom=0"], "serve.admission_headroom"],
                      [["serve.status_period_s=0"], "serve.status_period_s"],
                      [["sampler.method=nope"], "sampler.method"], [["--frob"], "--frob"],
                      [["missing.yaml"], "missing.yaml"]):
        assert main(args) == 2
        assert key in capsys.readouterr().err
    assert main(["--check", "serve.port=9001", "serve.max_batch_size=4"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["serve"]["port"] == 9001 and out["serve"]["host"] == "127.0.0.1" and out["sampler"]["nfe"] == 10


def test_serve_yaml_and_builder():
    from ray.serve.schema import ServeDeploySchema

    spec = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "infra" / "serve.yaml").read_text()))
    assert spec.http_options.host == "127.0.0.1"
    app = spec.applications[0]
    assert app.import_path == "pipeline.serve:build_app"
    assert app.deployments[0].autoscaling_config["max_replicas"] >= 1
    build_app(app.args)                        # the config it names loads and validates
    with pytest.raises(ConfigError, match="serve.max_num_images"):
        build_app({"overrides": ["serve.max_num_images=-1"]})
    with pytest.raises(ConfigError, match="unknown key"):
        build_app({"confg": "x.yaml"})


# ---------------------------------------------------------------- admission, projection, health (no Serve)
def serve_cfg(**kw):
    return load_serve_config(None, [f"serve.{k}={v}" for k, v in kw.items()]).serve


def test_admission_sheds_on_a_full_queue_or_a_deadline_the_work_ahead_would_break():
    now = [0.0]
    a = Admission(serve_cfg(max_ongoing_requests=2, max_queued_requests=1, admission_headroom=0.5, retry_after_s=1,
                            max_backlog_s=1000), clock=lambda: now[0])
    assert all(a.admit(f"r{i}", 1.0, 10.0).admitted for i in range(3))   # rate unknown: only the slots count
    d = a.admit("r3", 1.0, 10.0)
    assert (d.admitted, d.reason, d.retry_after_s) == (False, "queue_full", 1) and a.queue_depth() == 1
    for i in range(3):
        a.done(f"r{i}", latency_s=1.0 + i)
    a.observe("replica-1", 2.0)                                          # 2 work units per second
    assert a.admit("big", 100.0, 10.0).admitted                          # nothing ahead: admitted, however big
    d = a.admit("next", 1.0, 10.0)                                       # (100 + 1) / 2 = 50.5 s > 0.5 x 10 s
    assert (d.admitted, d.reason, d.retry_after_s) == (False, "deadline", 46) and d.estimated_s == 50.5
    a.done("big")
    assert a.admit("next", 1.0, 10.0).admitted and a.admit("after", 8.0, 10.0).admitted   # (1 + 8) / 2 <= 5
    assert not a.admit("late", 2.0, 10.0).admitted                       # (9 + 2) / 2 > 5
    a.observe("replica-2", 2.0)                                          # a second replica: twice the rate and slots
    assert a.rate() == 4.0 and a.slots() == 2 * 2 + 1 and a.admit("late", 2.0, 10.0).admitted
    now[0] += 61                                                         # not heard from for a minute: forgotten
    assert a.rate() is None and a.replicas() == 1
    assert a.percentiles() == {"p50": 2.0, "p95": 2.9, "p99": 2.98} and a.snapshot()["shed"] == {"queue_full": 1,
                                                                                                  "deadline": 2}
    b = Admission(serve_cfg(max_backlog_s=3, retry_after_s=1), clock=lambda: now[0])   # the backlog, in seconds
    b.observe("replica-1", 1.0)
    assert b.admit("a", 2.0, 30.0).admitted and b.admit("b", 1.0, 30.0).admitted          # 3 s of work: fits
    d = b.admit("c", 2.5, 30.0)                                                          # 5.5 s > 3 s
    assert (d.admitted, d.reason, d.retry_after_s) == (False, "queue_full", 3)


def test_a_batch_that_falls_behind_its_deadline_is_cancelled_at_a_model_evaluation():
    now = [0.0]
    p = Progress(stall_timeout_s=30.0, clock=lambda: now[0])
    model_fn = p.wrap(lambda x: x)
    p.start(deadline=10.0, expected_calls=100)
    for _ in range(100):                       # on pace: 100 x 0.09 s < 10 s
        model_fn(1)
        now[0] += 0.09
    p.stop()
    p.start(deadline=now[0] + 10.0, expected_calls=100)
    with pytest.raises(Abandoned):
        for _ in range(100):                   # 0.2 s per call: 20 s, twice the time left
            model_fn(1)
            now[0] += 0.2
    assert p.done == 25 and p.abandoned        # cancelled once a quarter is done, 5 s before the deadline
    with pytest.raises(Abandoned):
        model_fn(1)                            # the rest of the batch (bisected micro-batches) stops at once


def test_the_service_rate_counts_the_gaps_between_back_to_back_batches():
    from pipeline.serve import ServiceRate

    now = [1.0]
    rate = ServiceRate(clock=lambda: now[0])
    rate.update(2.0, started=0.0)                  # the first batch: 2 units of work in 1 s
    assert rate.value == 2.0
    now[0] = 2.5
    rate.update(2.0, started=1.2)                  # back to back: from the last one's end, 1.5 s
    second = 0.3 * 2.0 / 1.5 + 0.7 * 2.0
    assert rate.value == pytest.approx(second)
    now[0] = 12.0
    rate.update(2.0, started=11.0)                 # after an idle spell: its own second only
    assert rate.value == pytest.approx(0.3 * 2.0 + 0.7 * second)


def test_expected_model_calls_and_a_real_cancellation():
    """``expected_calls`` matches the Generator's model evaluations (micro-batches of ray.batch_size rows,
    particles included); a generation that cannot finish by its deadline stops early."""
    from pipeline.request import RequestFields, resolver_for

    cfg = load_serve_config(None, ["model.threads=1", "defaults.height=16", "defaults.width=16", "ray.batch_size=4",
                                   "search.reward=digits", "serve.max_steps=1000"])
    engine, resolve = GenerationEngine(cfg), resolver_for(cfg)

    def job(deadline=math.inf, **body):
        rows = [r.to_row() for r in resolve(RequestFields(prompt="3", seed=1, key="k", **body))]
        return Job(rows, "png", deadline=deadline)

    for body in ({"num_images": 6, "nfe": 5, "sampler": "euler"}, {"num_images": 2, "nfe": 7, "sampler": "dpmpp_2m"},
                 {"num_images": 2, "nfe": 4, "search": {"method": "svdd", "particles": 3}}, {"nfe": 6, "sampler": "heun"}):
        before = engine.progress.evaluations
        j = job(**body)
        assert engine.run([j])[0].error is None
        made, expected = engine.progress.evaluations - before, expected_calls(j.rows, 4)
        assert expected - 1 <= made <= expected, (body, made, expected)   # heun may save its last call
    t0 = time.monotonic()
    before = engine.progress.evaluations
    [result] = engine.run([job(deadline=t0 + 0.3, nfe=1000, num_images=4, sampler="euler")])
    assert result.timed_out and "request_timeout_s" in result.error
    assert time.monotonic() - t0 < 1.0 and engine.progress.evaluations - before < 1000   # not 1000 x 4 images


def test_liveness_fails_only_on_a_stall_and_readiness_reports_the_queue():
    snapshot = {"in_flight": 3, "queue_depth": 2, "replicas": 1, "service_rate": 1.5, "shed": {}, "latency_s": {}}
    busy = {"model_id": "m", "busy": True, "stalled": False, "queued": 2, "running": 1}
    assert liveness(busy, 0.1)[0] == 200 and liveness({}, None)[0] == 200       # busy or starting: alive
    assert liveness({**busy, "stalled": True}, 0.1)[0] == 503
    status, body = readiness(busy, 0.1, 3.0, "", snapshot)
    assert status == 200 and body["busy"] and body["queue_depth"] == 2 and body["generator"]["queued"] == 2
    assert readiness(busy, 5.0, 3.0, "TimeoutError", snapshot)[0] == 503             # no fresh status
    assert readiness({**busy, "stalled": True}, 0.1, 3.0, "", snapshot)[0] == 503


def test_the_generation_thread_yields_the_cpu_to_the_replicas_event_loop():
    import os
    import threading

    from pipeline.serve.engine import GENERATION_NICE, yield_cpu

    me, seen = threading.get_native_id(), {}
    before = os.getpriority(os.PRIO_PROCESS, me)

    def generation_thread():
        yield_cpu()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=generation_thread)
    t.start()
    t.join()
    assert seen["nice"] == min(19, before + GENERATION_NICE) and os.getpriority(os.PRIO_PROCESS, me) == before
