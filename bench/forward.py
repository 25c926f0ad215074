"""Forward-pass benchmark of the policy (any family): jitted logits (or hidden states) over [batch, seq].

Usage:
  python bench/forward.py --preset r1-distill-qwen-1.5b --batch 4 --seq 4096 --dtype bfloat16
  python bench/forward.py --preset tiny --batch 2 --seq 64            # CPU smoke run
  python bench/forward.py --checkpoint /path/to/hf_dir --batch 4 --seq 4096 --dtype bfloat16

Prints one JSON line: step_s (median over --iters timed steps after --warmup untimed ones),
compile_s, tokens_per_s = batch*seq/step_s, model TFLOP/s (forward FLOPs per token
2*N_matmul + 2*L*seq*N*D: N_matmul counts the q/k/v/o, MLP and LM-head weights, not the
embedding lookup; 2*L*seq*N*D is causal attention, QK^T and AV at 2*seq*N*D each, halved by the
mask; N*D = H for Qwen2), and the
device's peak memory (`memory_stats()`; null where the backend has none, as on CPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from prorl_jax.models import PRESETS, family_of, load_pretrained


def forward_flops_per_token(cfg, seq: int) -> float:
    """2 * matmul weights (q, k, v, o, gate, up, down, LM head) + causal attention
    2*L*seq*N*D (N*D query features: the hidden size for Qwen2, 2x it for Qwen3-0.6B)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * cfg.intermediate_size
    n_matmul = cfg.num_hidden_layers * per_layer + h * cfg.vocab_size
    return 2.0 * n_matmul + 2.0 * cfg.num_hidden_layers * seq * q


def build_model(args) -> nnx.Module:
    """The model from --checkpoint, or the preset randomly initialised inside one jit (no eager
    op-by-op init, no host copy of the parameters) with the "rbg" PRNG: threefry's temporaries
    took ~4x the embedding's bytes on CPU (8 GiB peak for a 1.2 GiB model), rbg's ~none."""
    param_dtype = args.param_dtype or args.dtype
    kw = dict(remat=args.remat, attention_impl=args.attention_impl)
    if args.checkpoint:
        return load_pretrained(args.checkpoint, jnp.dtype(args.dtype),
                               param_dtype=jnp.dtype(param_dtype), **kw)
    shape = parse_shape(getattr(args, "shape", ""))
    cfg = PRESETS[args.preset].replace(dtype=args.dtype, param_dtype=param_dtype, **kw, **shape)

    def make():
        return family_of(cfg).model_cls(cfg, rngs=nnx.Rngs(jax.random.key(args.seed,
                                                                          impl="rbg")))

    graphdef = nnx.graphdef(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())


def parse_shape(spec: str) -> dict:
    """'hidden_size=256,num_hidden_layers=4' -> {field: int or float} (preset overrides)."""
    out = {}
    for item in filter(None, (x.strip() for x in (spec or "").split(","))):
        key, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--shape: {item!r} is not field=value")
        out[key] = float(value) if "." in value or "e" in value else int(value)
    return out


def peak_memory_bytes() -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    return {"peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "bytes_in_use": stats.get("bytes_in_use"), "bytes_limit": stats.get("bytes_limit")}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="r1-distill-qwen-1.5b", choices=sorted(PRESETS))
    p.add_argument("--checkpoint", default=None, help="HF checkpoint dir (overrides --preset)")
    p.add_argument("--shape", default="", help="preset field overrides, e.g. num_hidden_layers=2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default=None, help="parameter dtype (default: --dtype)")
    p.add_argument("--remat", default="none")
    p.add_argument("--attention-impl", default="auto", choices=["auto", "xla", "cudnn"])
    p.add_argument("--output", default="logits", choices=["logits", "hidden"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    model = build_model(args)
    cfg = model.config
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, input_ids):
        m = nnx.merge(graphdef, params)
        return m(input_ids) if args.output == "logits" else m.hidden_states(input_ids)

    input_ids = jax.random.randint(jax.random.key(args.seed), (args.batch, args.seq), 0,
                                   cfg.vocab_size, dtype=jnp.int32)
    start = time.perf_counter()
    compiled = forward.lower(params, input_ids).compile()
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        compiled(params, input_ids).block_until_ready()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        out = compiled(params, input_ids)
        out.block_until_ready()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = args.batch * args.seq
    result = {
        "bench": "forward", "preset": None if args.checkpoint else args.preset,
        "checkpoint": args.checkpoint, "batch": args.batch, "seq": args.seq,
        "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "remat": cfg.remat,
        "attention_impl": cfg.attention_impl, "output": args.output,
        "output_shape": list(out.shape), "num_params": cfg.num_params(),
        "compile_s": round(compile_s, 3), "step_s": step_s, "step_s_all": times,
        "tokens_per_s": tokens / step_s,
        "model_tflops_per_s": forward_flops_per_token(cfg, args.seq) * tokens / step_s / 1e12,
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "jax_version": jax.__version__, **peak_memory_bytes(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
