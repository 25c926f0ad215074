"""The whole loop (`python -m prorl_jax.main`) as two jax.distributed processes on one machine:
embedded sampler and update on one mesh over both, metrics written once, checkpoints saved;
and the asynchronous pipeline on the vLLM test double, process 0 alone talking to it."""
import json
import os
import subprocess
import sys

import numpy as np

from prorl_jax import build
from prorl_jax.models import hf_tensors
from prorl_jax.pipeline import round_seed
from prorl_jax.rollout.vllm_protocol import prompt_seeds
from test_multihost import free_port
from test_multihost_rollout import wait_all
from test_pipeline_vllm import _served_versions
from test_trainer import small_config
from vllm_double import VLLMDouble

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


def test_two_processes_k1_on_vllm_process_zero_alone_talks(tmp_path):
    """rollout.max_staleness = 1 on the test double as two processes: process 0's producer
    thread sends every round once (each request seed once), batch t on version max(0, t - 1)
    as the double's load calls show, the other process trains on the broadcast batches, and
    the checkpoint of step 2 carries batch 2 (version 1)."""
    overrides = {"total_steps": 3, "batch.prompts_per_step": 8, "batch.mini_batch_prompts": 4,
                 "rollout.n": 4, "eval.every_steps": 0, "checkpoint.every_steps": 2,
                 "rollout.engine": "vllm", "rollout.max_staleness": 1,
                 "loss.correction": "tis", "mesh.fsdp": -1, "data.toy_train_size": 64,
                 "batch.micro_batch_rows": 8, "batch.dynamic_sampling": False,
                 "reset.interval_steps": 0}
    cfg = small_config(**overrides)
    model = build.build_model(cfg, build.load_tokenizer(cfg))
    tensors = {n: np.zeros_like(x) for n, x in hf_tensors(model, dtype=np.float32)}
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    with VLLMDouble(model="tiny", vocab_size=model.config.vocab_size, tensors=tensors,
                    num_workers=1) as double:
        flags = ["--config=configs/prorl.py:demo", f"--workdir={tmp_path}",
                 f"--coordinator_address={coordinator}", "--num_processes=2",
                 f"--config.rollout.vllm_urls={double.url}",
                 *[f"--config.{k}={v}" for k, v in overrides.items()]]
        procs = [subprocess.Popen([sys.executable, "-m", "prorl_jax.main", *flags,
                                   f"--process_id={i}"], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(2)]
        logs = wait_all(procs, 500)
        requests = list(double.requests)
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["rollout/staleness"] for r in rows] == [0, 1, 1]
    assert _served_versions(requests, cfg) == {(t, 0): {max(0, t - 1)} for t in range(3)}
    seeds = [r["body"]["seed"] for r in requests if r["path"] == "/v1/completions"]
    step_seeds = {s for s in seeds if s in _step_seeds(cfg)}
    assert len(step_seeds) == 3 * 8 and len([s for s in seeds if s in step_seeds]) == 3 * 8
    extra = json.load(open(tmp_path / "checkpoints" / "2" / "extra" / "metadata"))
    assert [(b["step"], b["weight_version"]) for b in extra["pipeline"]["batches"]] == [(2, 1)]
    assert "done at step 3" in logs[0] and "done at step 3" in logs[1]


def _step_seeds(cfg) -> set:
    """Every request seed of the run's generation rounds."""
    return {s for t in range(cfg.total_steps) for r in range(cfg.batch.max_generation_rounds)
            for s in prompt_seeds(round_seed(cfg.seed, t, r), cfg.batch.prompts_per_step,
                                  cfg.rollout.n)}
