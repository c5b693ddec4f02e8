"""Run a batch job on a multi-node Ray cluster on this machine and inject faults mid-job.

    python tests/scripts/cluster_faults.py node_loss|actor_kill OUTPUT_DIR MANIFEST

Prints one JSON line: {"images": ..., "faults": ...}. Used by tests/test_cluster.py, which
compares the output with an undisturbed run's.
"""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.config import load_config
from pipeline.job import run_job


def wait_for_commit(out: Path, n: int = 1, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and len(list((out / "stats").glob("*.json"))) < n:
        time.sleep(0.1)


def generator_actor_pids(nodes) -> list[int]:
    """PIDs of the generator actors on these nodes: 'ray::MapWorker...' processes whose parent is one of their raylets."""
    raylets = {info.process.pid for node in nodes
               for kind, infos in node.all_processes.items() if kind == "raylet" for info in infos}
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith("ray::MapWorker") and ppid in raylets:
            pids.append(int(proc.name))
    return pids


def main(mode: str, out: str, manifest: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    cfg = load_config(None, [f"manifest.path={manifest}", f"output.path={out}", "output.rows_per_shard=4",
                             "defaults.height=16", "defaults.width=16", "ray.batch_size=1", "ray.actors=2",
                             "ray.num_cpus_per_actor=1", "output.contact_sheet=0", "sampler.nfe=4"])
    result, faults = {}, []

    def run() -> None:
        try:
            result["summary"] = run_job(cfg)
        except Exception as e:  # reported in the JSON line
            result["error"] = f"{type(e).__name__}: {e}"[-2000:]
    job = threading.Thread(target=run, daemon=True)
    job.start()
    if mode == "node_loss":
        wait_for_commit(Path(out), 1)
        # a node that runs a generator actor (and so an in-flight batch) vanishes mid-job
        victim = next((w for w in workers if generator_actor_pids([w])), workers[0])
        hosted = generator_actor_pids([victim])
        cluster.remove_node(victim, allow_graceful=False)
        faults.append(f"removed a worker node hosting generator actor pid(s) {hosted}")
        cluster.add_node(num_cpus=2)                              # the autoscaler would replace it
    elif mode == "actor_kill":
        for k in range(3):                                        # kill the generator actors in 3 rounds
            wait_for_commit(Path(out), 1 + 2 * k)
            pids, deadline = [], time.time() + 60                 # restarted actors may still be starting
            while not pids and job.is_alive() and time.time() < deadline:
                for pid in generator_actor_pids([cluster.head_node, *cluster.worker_nodes]):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        pids.append(pid)
                    except ProcessLookupError:                    # it exited between the listing and the kill
                        pass
                time.sleep(0.1)
            faults.append(f"round {k + 1}: killed actor pid(s) {pids}")
            time.sleep(1.0)
    job.join(timeout=400)
    summary = result.get("summary")
    print(json.dumps({"images": summary.images if summary else None, "faults": faults,
                      "alive": job.is_alive(), "error": result.get("error")}), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
