"""The whole loop (`python -m prorl_jax.main`) as two jax.distributed processes on one machine:
embedded sampler and update on one mesh over both, metrics written once, checkpoints saved."""
import json
import os
import subprocess
import sys

from test_multihost import free_port
from test_multihost_rollout import wait_all

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_runs_as_two_processes(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    flags = ["--config=configs/prorl.py:demo", f"--workdir={tmp_path}",
             f"--coordinator_address={coordinator}", "--num_processes=2",
             "--config.total_steps=3", "--config.mesh.fsdp=-1", "--config.eval.every_steps=2",
             "--config.checkpoint.every_steps=2", "--config.batch.prompts_per_step=8",
             "--config.batch.mini_batch_prompts=4", "--config.rollout.n=4"]
    procs = [subprocess.Popen([sys.executable, "-m", "prorl_jax.main", *flags,
                               f"--process_id={i}"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = wait_all(procs, 500)
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3]  # process 0 alone writes them
    assert "val/toy/pass@1" in rows[1] and rows[2]["kl"] > 0
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
    assert "done at step 3" in logs[0] and "done at step 3" in logs[1]
