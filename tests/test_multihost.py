"""Two processes (jax.distributed on localhost, CPU, 2 devices each, one FSDP mesh over all 4)
each feeding half of the rows give the same updates as one process on one device, and a
checkpoint they save together restores exactly onto another mesh (FSDP 2 x tensor 2)."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from train_helpers import (MODEL_CFG, TWO_PROCESS_STEPS, fresh_state, make_batch,
                           train_step_for)

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(out_dir: str) -> list:
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    out = os.path.join(out_dir, "result.json")
    return [subprocess.Popen([sys.executable, os.path.join(HERE, "train_helpers.py"),
                              coordinator, "2", str(i), out], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def finish(procs: list, out_dir: str) -> dict:
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    with open(os.path.join(out_dir, "result.json")) as f:
        return json.load(f)


def test_two_processes_match_one_device(tmp_path):
    procs = start_two_processes(str(tmp_path))
    step, sh = train_step_for((1, 1, 1))  # the reference, computed while the workers run
    state = jax.device_put(fresh_state(), sh)
    want = []
    for i in range(TWO_PROCESS_STEPS):
        state, metrics = step(state, make_batch(seed=i))
        want.append({k: float(v) for k, v in metrics.items()})
    result = finish(procs, str(tmp_path))
    assert result["processes"] == 2 and result["num_devices"] == 4
    assert result["restored_equal"] is True  # checkpoint saved by both, restored on 2 x 2
    for got, ref in zip(result["metrics"], want):
        assert got["nonfinite"] == 0.0
        for k in ("loss", "grad_norm", "kl", "entropy", "num_tokens"):
            np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, err_msg=k)
    params = np.load(os.path.join(tmp_path, "params.npz"))
    # The HF directory both processes wrote from the sharded params (each tensor cast and
    # transposed on device, then gathered) is byte for byte what one process writes from the
    # same weights on the host.
    from prorl_jax.models import save_pretrained
    host = jax.tree.unflatten(jax.tree.structure(state.params),
                              [params[f"leaf{i}"] for i in range(len(params.files))])
    save_pretrained(host, str(tmp_path / "hf_one"), config=MODEL_CFG, dtype="bfloat16")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "hf_one" / name).read_bytes()
    leaves = jax.tree.leaves(state.params)
    assert len(params.files) == len(leaves)
    for i, leaf in enumerate(leaves):
        np.testing.assert_allclose(params[f"leaf{i}"], np.asarray(leaf), rtol=0, atol=1e-5)
