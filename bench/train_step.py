"""Times one GRPO iteration's training work: the old-policy and reference log-prob passes
(no gradients) and one update (policy forward + backward + AdamW) on a batch of B x T tokens.

Prints one JSON line: tokens/s (B*T per iteration), model-FLOPs utilisation against a bf16
matmul rate measured on this device, and peak memory. With --peer it first runs
bench/torch_peer_train.py (transformers + torch, the same work, in its own process) and prints
its figures and the ratio.

    python bench/train_step.py --preset r1-distill-qwen-1.5b --batch 4 --seq 4096 --peer
    python bench/train_step.py --preset r1-distill-qwen-1.5b --batch 1 --seq 16384  # 16k fit
    python bench/train_step.py --preset tiny --batch 2 --seq 64 --peer        # CPU smoke run

Model FLOPs per iteration (as the peer counts them; remat recomputation is not counted):
    tokens * (6 N + 2 * 2 N) + tokens * attn(T) * (3 + 2)
with N the matmul parameters (layers + LM head, not the embedding lookup), 6N for the update's
forward + backward, 2N per no-grad pass, and attn(T) = L * 2 * 2 * T * N*D / 2 per token (causal;
N*D query features, = H for Qwen2).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prorl_jax import sharding as S  # noqa: E402
from prorl_jax import train_state as TS  # noqa: E402
from prorl_jax import update as U  # noqa: E402
from prorl_jax.models import PRESETS, init_model  # noqa: E402


def matmul_params(cfg) -> int:
    """N: parameters that take part in a matmul per token (layers + LM head)."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    return cfg.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * f) + h * cfg.vocab_size


def iteration_flops(cfg, batch: int, seq: int) -> float:
    tokens = batch * seq
    n = matmul_params(cfg)
    q_width = cfg.num_attention_heads * cfg.head_dim  # = hidden_size for Qwen2
    attn_per_token = cfg.num_hidden_layers * 2 * 2 * seq * q_width / 2
    return tokens * (6 * n + 2 * 2 * n) + tokens * attn_per_token * (3 + 2)


def measure_matmul_tflops(size: int, repeats: int = 10) -> float:
    """Achieved bf16 matmul rate (TFLOP/s) of [size, size] @ [size, size] on device 0."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.bfloat16))
    f(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a, b)
    out.block_until_ready()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e12


def peak_memory_gb() -> tuple[float, str]:
    """Peak device memory (accelerators) or the process's peak RSS (CPU), in GiB."""
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device_peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host_peak_rss"


def make_batch(cfg, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.float32)
    mask[:, -1] = 0.0
    return dict(input_ids=ids, targets=np.roll(ids, -1, axis=1), loss_mask=mask,
                advantages=rng.normal(size=batch).astype(np.float32))


def build(args):
    cfg = PRESETS[args.preset].replace(dtype=args.dtype, param_dtype="float32",
                                       remat=args.remat, attention_impl=args.attention)
    mesh = S.make_mesh(S.MeshConfig(data=1, fsdp=-1, tensor=args.tensor))
    model = init_model(cfg, seed=0)
    graphdef, params = TS.split_params(model)
    del model
    optim = TS.OptimConfig()
    tx = TS.make_optimizer(optim)
    state = TS.init_train_state(params, tx, ref_dtype=args.ref_dtype)
    del params
    shardings = S.tree_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    ucfg = U.UpdateConfig(temperature=1.2, micro_batch_rows=args.micro_batch_rows,
                          logprob_chunk=args.logprob_chunk)
    step = U.make_train_step(graphdef, tx, TS.make_schedule(optim), ucfg, mesh=mesh,
                             state_shardings=shardings, donate=True)
    logprob_fn = U.make_logprob_fn(graphdef, ucfg, mesh=mesh, param_shardings=shardings.params)
    return cfg, mesh, state, step, logprob_fn


def run_ours(args) -> dict:
    cfg, mesh, state, step, logprob_fn = build(args)
    batch = S.global_batch(make_batch(cfg, args.batch, args.seq), mesh)

    def iteration(state):
        old_logp, _ = logprob_fn(state.params, batch)
        ref_logp, _ = logprob_fn(state.ref_params, batch)
        return step(state, dict(batch, old_logp=old_logp, ref_logp=ref_logp))

    start = time.perf_counter()
    state, metrics = iteration(state)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = iteration(state)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / args.steps
    tflops = args.peak_tflops or measure_matmul_tflops(args.matmul_size)
    mem_gb, mem_kind = peak_memory_gb()
    tokens = args.batch * args.seq
    return dict(figure="train_step", impl="prorl-jax", preset=args.preset, batch=args.batch,
                seq=args.seq, devices=jax.device_count(), backend=jax.default_backend(),
                remat=args.remat, step_s=round(step_s, 4), first_iteration_s=round(compile_s, 1),
                tokens_per_s=round(tokens / step_s, 1),
                mfu=round(iteration_flops(cfg, args.batch, args.seq) / step_s / (tflops * 1e12), 4),
                matmul_tflops=round(tflops, 3), peak_mem_gb=round(mem_gb, 2),
                peak_mem_kind=mem_kind, loss=float(metrics["loss"]),
                nonfinite=float(metrics["nonfinite"]))


def run_peer(args) -> dict:
    """Runs the peer in a fresh process (before our JAX backend holds the accelerator)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_peer_train.py")
    cmd = [sys.executable, script, "--preset", args.preset, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the peer imports the presets only
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"peer failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="r1-distill-qwen-1.5b", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5, help="timed iterations after one warm-up")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--ref-dtype", default="bfloat16")
    p.add_argument("--remat", default="dots_no_batch",
                   choices=("none", "full", "dots", "dots_no_batch"))
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    p.add_argument("--micro-batch-rows", type=int, default=0, help="0: whole batch at once")
    p.add_argument("--logprob-chunk", type=int, default=4096)
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel axis size")
    p.add_argument("--matmul-size", type=int, default=0,
                   help="side of the bf16 matmul timed for MFU (0: 8192 on GPU/TPU, 1024 on CPU)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="use this bf16 rate instead of measuring it")
    p.add_argument("--peer", action="store_true", help="also run transformers + torch")
    return p.parse_args(argv)


def main(argv=None, peer: Optional[dict] = None) -> list[dict]:
    """Runs the figures and prints them; -> [ours, peer, ratio] (peer and ratio with --peer).
    `peer`: the peer's figure measured earlier (bench/gpu_suite.py runs the peers first)."""
    args = parse_args(argv)
    if args.peer and peer is None:
        peer = run_peer(args)  # first: it needs the accelerator to itself
    if not args.matmul_size:
        args.matmul_size = 1024 if jax.default_backend() == "cpu" else 8192
    ours = run_ours(args)
    print(json.dumps(ours), flush=True)
    results = [ours]
    if peer is not None:
        flops = iteration_flops(PRESETS[args.preset], args.batch, args.seq)
        peer["mfu"] = round(flops / peer["step_s"] / (ours["matmul_tflops"] * 1e12), 4)
        ratio = dict(figure="ratio", tokens_per_s_ours_over_peer=round(
            ours["tokens_per_s"] / peer["tokens_per_s"], 3))
        results += [peer, ratio]
        for figure in results[1:]:
            print(json.dumps(figure), flush=True)
    return results


if __name__ == "__main__":
    main()
