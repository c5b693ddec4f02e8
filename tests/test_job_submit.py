"""`ray job submit` against a real Ray head started with `ray start --head` on localhost.

The head gets its own ports and its own ``--temp-dir``, so it neither collides with the
session's ``ray_session`` instance nor becomes the cluster a plain ``ray.init()`` joins
(``ray start`` records its address in ``<temp-dir>/ray_current_cluster``). It binds the
dashboard (and so the job API) to 127.0.0.1, runs with Ray's token authentication
(``RAY_AUTH_MODE=token``, the token in ``RAY_AUTH_TOKEN``), and is torn down by signalling only the processes it started
(never ``ray stop``, which would kill every Ray instance on the machine).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from glob import glob
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).parent / "ray")
# What the working-dir upload leaves out (it also honours .gitignore).
EXCLUDES = [".git", ".venv", "outputs", "**/__pycache__", ".pytest_cache", "bench/results"]
SMALL_JOB = ["jobs/configs/synthetic_digits.yaml", "manifest.count=3", "sampler.nfe=4",
             "output.rows_per_shard=10", "ray.batch_size=10", "ray.actors=1", "output.contact_sheet=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_env(**extra: str) -> dict:
    """The environment of the head and of the CLI: token auth off unless ``extra`` turns it
    on, no inherited address or token, and the venv first on PATH so the job's ``python`` is
    the one with the project."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="disabled", RAY_DATA_DISABLE_PROGRESS_BARS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def process_tree(root: int) -> dict[int, bytes]:
    """``{pid: cmdline}`` of ``root`` and all its descendants (read from /proc; no extra dependency).

    Ray's worker processes start new sessions, so a process group does not catch them; their
    parent links do."""
    children: dict[int, list[int]] = {}
    cmdlines: dict[int, bytes] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdlines[int(d.name)] = (d / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in cmdlines:
            tree[pid] = cmdlines[pid]
        todo.extend(children.get(pid, []))
    return tree


def kill_survivors(tree: dict[int, bytes]) -> None:
    """SIGKILL the processes of ``tree`` that still run the same command line."""
    for pid, cmdline in tree.items():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


class Head:
    """A `ray start --head --block` process with its own ports and temp dir."""

    def __init__(self, **env: str):
        self.env = head_env(**env)
        # A short temp dir: Ray's unix socket paths under it must stay under 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        cmd = [RAY_CLI, "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
               f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}"]
        self.log = open(Path(self.temp_dir) / "head.log", "wb")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 90) -> None:
        """Until the job API answers on localhost."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:
                if e.code == 401:          # it answers, and wants the token
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the Ray head did not answer on {self.address} in {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return (Path(self.temp_dir) / "head.log").read_text(errors="replace")[-4000:]

    def stop(self, grace: float = 5) -> None:
        """SIGTERM the `--block` process (it shuts its node down); after ``grace`` seconds,
        SIGKILL whatever is left of the processes it started. Then remove the temp dir."""
        tree = process_tree(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        kill_survivors(tree)
        self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def submit(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir . -- python -m jobs.generate ARGS``; waits for the end."""
        cmd = [RAY_CLI, "job", "submit", "--address", self.address, "--working-dir", ".",
               "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
               "--", "python", "-m", "jobs.generate", *args]
        return subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head():
    """One head for the module, with token authentication on (the token travels in the
    environment of the head and of our CLI calls; nothing is written to ~/.ray)."""
    import secrets

    h = Head(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()


def read_back(out: Path) -> tuple[dict, list[str], int]:
    """``_SUCCESS``, the keys in the WebDataset tars, and the Parquet row count."""
    import pyarrow.dataset as pads
    import webdataset as wds
    from PIL import Image

    success = json.loads((out / "_SUCCESS").read_text())
    keys = []
    for sample in wds.WebDataset(sorted(glob(str(out / "shards" / "*.tar"))), shardshuffle=False):
        assert Image.open(io.BytesIO(sample["png"])).size == (16, 16)
        assert json.loads(sample["json"])["nfe"] == 4
        keys.append(sample["__key__"])
    rows = pads.dataset(str(out / "parquet")).count_rows()
    return success, keys, rows


@pytest.mark.timeout(300)
def test_submitted_job_succeeds_and_writes_complete_dataset(head, tmp_path):
    out = tmp_path / "out"
    res = head.submit(*SMALL_JOB, f"output.path={out}")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "wrote 30 images in 3 shards" in res.stdout + res.stderr
    # It ran on the submitted cluster, not on a fresh local instance of its own.
    assert "Connecting to existing Ray cluster" in res.stdout + res.stderr
    success, keys, rows = read_back(out)
    assert success["images"] == 30 and len(success["shards"]) == 3
    assert sorted(keys) == [f"{i:09d}" for i in range(30)]
    assert rows == 30


@pytest.mark.timeout(300)
def test_failing_job_gives_nonzero_exit_status(head, tmp_path):
    out = tmp_path / "bad"
    res = head.submit("jobs/configs/digits.yaml", "manifest.path=jobs/manifests/no-such-file.jsonl",
                      f"output.path={out}")
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "no-such-file.jsonl" in text and "failed" in text
    assert not (out / "_SUCCESS").exists()


@pytest.mark.timeout(180)
def test_token_authentication_refuses_callers_without_the_token(head):
    """The job API answers only requests that carry the cluster's token."""
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{head.address}/api/jobs/", timeout=10)
    assert e.value.code == 401

    def cli(command, *args, **env):
        return subprocess.run([RAY_CLI, "job", command, "--address", head.address, *args],
                              env=head_env(**env), capture_output=True, text=True, timeout=60)
    wrong = cli("submit", "--no-wait", "--", "echo", "pwned", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="wrong")
    assert wrong.returncode != 0 and "invalid" in wrong.stdout + wrong.stderr
    assert cli("list").returncode != 0                              # no token at all
    ok = cli("list", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.env["RAY_AUTH_TOKEN"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "pwned" not in ok.stdout + ok.stderr                   # the refused job never ran
