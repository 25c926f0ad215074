"""Two trainer processes share a vLLM server: only process 0 talks to it (one weight sync, one
set of generation requests) and both get the same rollouts."""
import json
import os
import subprocess
import sys

from test_multihost import free_port
from vllm_double import VLLMDouble

HERE = os.path.dirname(os.path.abspath(__file__))


def wait_all(procs: list, timeout_s: float) -> list[str]:
    """Waits for the subprocesses (killing any left at the end); asserts each exited 0."""
    try:
        logs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return logs


def test_process_zero_engine_talks_once_and_broadcasts(tmp_path):
    with VLLMDouble() as server:
        coordinator = f"127.0.0.1:{free_port()}"
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
        procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_rollout_worker.py"),
                                   coordinator, str(i), server.url, str(tmp_path)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(2)]
        wait_all(procs, 240)
        completions = server.paths("/v1/completions")
        loads = [r for r in server.requests if r["path"] == "/collective_rpc"
                 and "load" in json.dumps(r["body"])]
    batches = [json.load(open(tmp_path / f"batch_{i}.json")) for i in range(2)]
    assert batches[0] == batches[1] and len(batches[0]["token_ids"]) == 4
    # One client's traffic: the start-up log-prob check (2 requests) plus one request per prompt.
    assert len(completions) == 4, completions
    assert len(loads) == 1 and server.weight_version == 1
    assert (tmp_path / "took_part_1").exists() and not (tmp_path / "took_part_0").exists()


def test_jax_sampler_over_two_processes_equals_one(tmp_path):
    """The embedded sampler (continuous batching, 2 slots per shard) on a mesh spanning two
    processes returns, on each, the rollouts of a one-process run (2 devices) with the same
    seed, which equal the static path's."""
    coordinator = f"127.0.0.1:{free_port()}"
    base = dict(os.environ, JAX_PLATFORMS="cpu",
                PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    script = os.path.join(HERE, "multihost_rollout_worker.py")
    one = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, script, "sampler", coordinator, str(i),
                               str(tmp_path)], env=one, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    two = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs.append(subprocess.Popen([sys.executable, script, "sampler", "single", "0",
                                   str(single_dir)], env=two, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
    wait_all(procs, 300)
    got = [json.load(open(tmp_path / f"sampler_{i}.json")) for i in range(2)]
    want = json.load(open(single_dir / "sampler_0.json"))
    assert want.pop("static_token_ids") == want["token_ids"]  # continuous == static batching
    assert got[0] == got[1] == want and len(want["token_ids"]) == 8
