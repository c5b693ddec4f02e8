"""infra/: the KubeRay manifests, the cluster launcher YAML and the Dockerfile, checked as text;
the image's install steps are replayed without Docker.

Nothing here talks to Kubernetes, AWS or Docker (no engine on this machine). The checks are
the ones that break silently: every YAML parses; the fields that name the project (entrypoint
module, config file and overrides, Serve import path, image, Ray version) resolve against this
repository; nothing exposes Ray's dashboard/job API or Serve publicly; the batch job has a
deadline, shuts down after finishing, autoscales and asks for GPUs; the image installs the
project and bakes in no credentials.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
RAY_PORTS = {8265, 10001}                      # dashboard/job API, Ray client
PUBLIC_SERVICE_TYPES = {"LoadBalancer", "NodePort"}


def load(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def walk(node, path=()):
    """Every (path, key, value) of a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, path + (i,))


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def pinned_ray_version() -> str:
    m = re.search(r"^ray==([\d.]+)\s*$", (REPO / "constraints.txt").read_text(), re.M)
    assert m, "constraints.txt pins no ray version"
    return m.group(1)


def entrypoint_config(entrypoint: str) -> tuple[str, list[str]]:
    """(config path, overrides) of ``python -m jobs.generate <config> key=value ...``."""
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "jobs.generate"], f"entrypoint does not run jobs.generate: {argv[:3]}"
    from jobs.cli import parse_args
    from jobs.generate import FLAGS
    path, overrides, _ = parse_args(argv[3:], FLAGS)
    assert path is not None, "the entrypoint names no config file"
    return path, overrides


@pytest.fixture(scope="module")
def rayjob():
    return load("rayjob.yaml")


@pytest.fixture(scope="module")
def rayservice():
    return load("rayservice.yaml")


@pytest.fixture(scope="module")
def cluster():
    return load("cluster.yaml")


@pytest.fixture(scope="module")
def serve_config(rayservice):
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


# ---------------------------------------------------------------- every file
@pytest.mark.parametrize("path", sorted(INFRA.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_parses_and_exposes_nothing_publicly(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert doc.get("kind") not in ("Ingress", "Route", "Gateway"), f"{path.name}: publishes through {doc['kind']}"
        for where, key, value in walk(doc):
            assert not (key in ("serviceType", "type") and value in PUBLIC_SERVICE_TYPES), \
                f"{path.name}: {'.'.join(map(str, where + (key,)))} = {value}"
            assert not (key in ("enableIngress", "hostNetwork") and value is True), f"{path.name}: {key}: true"
            assert key != "hostPort", f"{path.name}: hostPort at {'.'.join(map(str, where))}"
            assert key != "nodePort", f"{path.name}: nodePort at {'.'.join(map(str, where))}"


def test_one_image_everywhere_matches_the_dockerfile_and_the_ray_pin(rayjob, rayservice, cluster):
    images = {c["image"] for c in containers(rayjob["spec"]["rayClusterSpec"])}
    images |= {c["image"] for c in containers(rayservice["spec"]["rayClusterConfig"])}
    images.add(cluster["docker"]["image"])
    assert len(images) == 1, f"manifests use different images: {sorted(images)}"
    image = images.pop()
    assert f"-t {image} " in DOCKERFILE.read_text(), f"infra/Dockerfile does not build {image}"
    ray = pinned_ray_version()
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray


# ---------------------------------------------------------------- RayJob
def test_rayjob_entrypoint_runs_a_config_of_this_repo_that_validates(rayjob, monkeypatch):
    from pipeline.config import load_config
    monkeypatch.setenv("RAY_ADDRESS", "auto")     # as Ray sets it for a job's entrypoint: the GPUs are the workers'

    path, overrides = entrypoint_config(rayjob["spec"]["entrypoint"])
    assert path.startswith("jobs/configs/") and (REPO / path).is_file(), f"no such config in the repo: {path}"
    cfg = load_config(REPO / path, overrides)           # unknown keys or bad values raise ConfigError
    assert cfg.ray.num_gpus_per_actor >= 1 and cfg.model.device.startswith("cuda")
    assert cfg.output.path.startswith("s3://"), "a cluster job must write to object storage, not the pod's disk"


def test_rayjob_shuts_down_has_a_deadline_and_autoscales_gpu_workers(rayjob):
    spec = rayjob["spec"]
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["enableInTreeAutoscaling"] is True
    (group,) = cluster_spec["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] > group["minReplicas"], "no autoscaling range"
    for c in group["template"]["spec"]["containers"]:
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, f"{c['name']} requests no GPU"
    path, overrides = entrypoint_config(spec["entrypoint"])
    actors = [o for o in overrides if o.startswith("ray.actors=")]
    assert actors and int(actors[0].split("=")[1]) == group["maxReplicas"], \
        "ray.actors should match the GPU workers the autoscaler may add (maxReplicas x 1 GPU)"


@pytest.mark.parametrize("name,key", [("rayjob.yaml", "rayClusterSpec"), ("rayservice.yaml", "rayClusterConfig")])
def test_head_is_cluster_internal_with_token_auth(name, key):
    cluster_spec = load(name)["spec"][key]
    assert cluster_spec["authOptions"]["mode"] == "token"
    assert cluster_spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    for c in containers(cluster_spec):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("RAY_AUTH_MODE") != "disabled", f"{name}: {c['name']} turns token auth off"


def test_networkpolicy_limits_the_head_to_its_namespace():
    policy = load("networkpolicy.yaml")
    assert policy["kind"] == "NetworkPolicy"
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    assert [rule["from"] for rule in policy["spec"]["ingress"]] == [[{"podSelector": {}}]]


# ---------------------------------------------------------------- RayService
def test_rayservice_runs_the_serve_app_of_infra_serve_yaml(serve_config, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")     # the app is built inside the cluster: the GPUs are the workers'
    (app,) = serve_config["applications"]
    local = yaml.safe_load((INFRA / "serve.yaml").read_text()) if (INFRA / "serve.yaml").exists() else None
    if local is not None:
        assert app["import_path"] == local["applications"][0]["import_path"]
    module, attr = app["import_path"].split(":")
    assert (REPO / Path(app["args"]["config"])).is_file()
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    from pipeline.serve import load_serve_config
    cfg = load_serve_config(REPO / app["args"]["config"], list(app["args"]["overrides"]))
    assert cfg.ray.num_gpus_per_actor >= 1 and cfg.serve.max_replicas > cfg.serve.min_replicas


def test_rayservice_probes_use_the_health_routes_that_never_queue(rayservice, serve_config, monkeypatch):
    """Worker pods' readiness is /readyz and liveness /healthz, on the Serve port, routes the app's
    router answers without entering the generation queue; liveness gives Serve's own replica health
    check time to act first, so a stall restarts the pod only if it outlasts a replica restart."""
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    from pipeline.serve import load_serve_config
    from pipeline.serve.app import app as http_app

    routes = set(http_app.openapi()["paths"])
    port = serve_config["http_options"]["port"]
    (app,) = serve_config["applications"]
    cfg = load_serve_config(REPO / app["args"]["config"], list(app["args"]["overrides"]))
    s = cfg.serve
    for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            ready, live = c["readinessProbe"], c["livenessProbe"]
            assert (ready["httpGet"]["path"], live["httpGet"]["path"]) == ("/readyz", "/healthz")
            assert ready["httpGet"]["port"] == live["httpGet"]["port"] == port
            assert {"/readyz", "/healthz"} <= routes
            window = live["failureThreshold"] * live["periodSeconds"]
            assert window > s.stall_timeout_s + s.health_check_period_s + s.health_check_timeout_s, window


@pytest.mark.parametrize("where", ["serve.yaml", "rayservice.yaml"])
def test_serve_configs_leave_the_queue_limits_to_the_router(where):
    """A Serve config that sets max_ongoing_requests or max_queued_requests on the model deployment
    would put the router's status calls (health) behind generation again; deployments named in it
    must exist in the code."""
    from pipeline.serve import ImageGenerator, Router

    doc = load(where)
    spec = yaml.safe_load(doc["spec"]["serveConfigV2"]) if where == "rayservice.yaml" else doc
    for app in spec["applications"]:
        for d in app.get("deployments", []):
            assert d["name"] in (ImageGenerator.name, Router.name), d["name"]
            if d["name"] == ImageGenerator.name:
                assert not {"max_ongoing_requests", "max_queued_requests", "backpressure_config"} & set(d), d


def test_rayservice_asks_for_gpus(rayservice):
    for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        for c in g["template"]["spec"]["containers"]:
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1


# ---------------------------------------------------------------- cluster launcher
def test_cluster_yaml_matches_ray_schema_and_binds_dashboard_to_localhost(cluster):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmd in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(cluster[cmd]), f"{cmd} does not turn token auth on"
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    gpu = [t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]]
    assert gpu and all(t["max_workers"] > t.get("min_workers", 0) for t in gpu)


# ---------------------------------------------------------------- Dockerfile
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_dockerfile_installs_the_project_on_the_pinned_ray_image():
    ins = dockerfile_instructions()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1].strip('"') for k, a in ins if k == "ARG" and "=" in a}
    base = next(a for k, a in ins if k == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(pinned_ray_version())}-py311-(gpu|cu\d+)", base), base
    assert ("WORKDIR", "/app") in ins
    runs = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a) for k, a in ins if k == "RUN"]
    project = next(i for i, r in enumerate(runs) if re.search(r"pip install [^&]*-c constraints\.txt \.(\s|$)", r))
    torch = next(i for i, r in enumerate(runs) if re.search(r"pip install .*torch", r))
    assert torch < project, "torch (the CUDA build) must be installed before the project, or pip picks its own"
    sources = [s for k, a in ins if k == "COPY" for s in a.split()[:-1] if not s.startswith("--")]
    assert {"pyproject.toml", "constraints.txt", "pipeline", "jobs"} <= set(sources), sources
    for s in sources:
        assert (REPO / s).exists(), f"COPY {s}: not in the repository"


def test_dockerfile_bakes_in_no_credentials():
    ins = dockerfile_instructions()
    secret = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.I)
    for k, a in ins:
        if k in ("ENV", "ARG"):
            assert not secret.search(a.split("=", 1)[0]), f"{k} {a}: credentials do not belong in the image"
        if k in ("COPY", "ADD"):
            assert not re.search(r"\.aws|auth_token|\.env\b|\.ssh|\.netrc", a), f"{k} {a}"
    assert "aws_access_key_id" not in DOCKERFILE.read_text().lower()
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "**/auth_token"} <= set(ignore)


def test_the_images_install_steps_give_a_working_package_outside_the_repo(tmp_path):
    """Replay the Dockerfile without Docker: its COPY sources as the build context, a wheel
    built from them, installed without the repository; the packaged weights, configs and
    manifest must come along (a missing package-data entry breaks every pod at start)."""
    import shutil
    import subprocess
    import sys

    context = tmp_path / "app"
    context.mkdir()
    for k, a in dockerfile_instructions():
        if k == "COPY":
            *sources, dest = [s for s in a.split() if not s.startswith("--")]
            for s in sources:        # `COPY a b ./` copies into the folder, `COPY pipeline ./pipeline` names it
                target = context / dest / Path(s).name if dest.endswith("/") else context / dest
                (shutil.copytree if (REPO / s).is_dir() else shutil.copy)(REPO / s, target)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(context)],
                   check=True, cwd=tmp_path)
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), *map(str, wheels.glob("*.whl"))],
                   check=True, cwd=tmp_path)
    probe = ("import pipeline, jobs.generate; from pipeline.models import digits; from pathlib import Path; "
             "digits.load(); import jobs; d = Path(jobs.__file__).parent; "
             "import json; print(json.dumps([pipeline.__file__, sorted(p.relative_to(d).as_posix() for p in (d / 'configs').rglob('*.yaml')), "
             "sorted(p.name for p in (d / 'manifests').iterdir())]))")
    run = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {probe}"],
                         check=True, cwd=tmp_path, capture_output=True, text=True)
    where, configs, manifests = json.loads(run.stdout)
    assert where.startswith(str(site)), where
    assert configs == sorted(p.relative_to(REPO / "jobs").as_posix() for p in (REPO / "jobs" / "configs").rglob("*.yaml"))
    assert manifests == sorted(p.name for p in (REPO / "jobs" / "manifests").iterdir())
