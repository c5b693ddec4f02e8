"""Serve shuts down cleanly: its own app, in its own module, since shutting Serve down ends every app."""
import socket
import time

import httpx
import pytest

from pipeline.serve import app_from_config, load_serve_config

pytestmark = pytest.mark.timeout(300)


def test_shutdown_is_clean(ray_session):
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_serve_config(None, ["ray.num_cpus_per_actor=0.25", "model.threads=1", "defaults.height=16",
                                   "defaults.width=16"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_from_config(cfg), name="shutdown", route_prefix="/")
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
    t0 = time.monotonic()
    serve.shutdown()
    assert time.monotonic() - t0 < 30
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
