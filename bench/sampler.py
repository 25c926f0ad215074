"""Generation benchmark of the embedded JaxSampler: generated tokens/s next to the
memory-bandwidth roofline and, with --peer, Hugging Face transformers' `generate` on the same
shape in the same run (as /work/shared/bench/torch_peer.py does).

Usage:
  python bench/sampler.py --preset r1-distill-qwen-1.5b --batch 64 --prompt 256 --new 512 --peer
  python bench/sampler.py --preset tiny --batch 4 --prompt 16 --new 16 --peer   # CPU smoke run

Workload: --batch rows = batch/n random prompts of --prompt tokens x --n samples each, sampling
at temperature 1.2, top_p 1, no stop ids, so every row generates exactly --new tokens.
tokens_per_s = batch * new / generate_s (prefill included), decode_tokens_per_s excludes the
prefill; both the median over --iters timed calls after one untimed warm-up (compile) call.

Roofline: a decode step must read every weight once (the LM head included, the embedding table
not: only B rows of it are gathered) plus each row's KV cache, on average
prompt + (new + 1) / 2 slots of L * 2 * K * D values. The bound is
  roofline_tokens_per_s = batch / ((weight_bytes + kv_bytes) / hbm_bytes_per_s),
with the H100 SXM figure 3.35e12 B/s by default (--hbm-bytes-per-s).
Prints one JSON line per figure ("jax_sampler", "peer") and a last one with the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import build_model  # noqa: E402  (bench/forward.py: the model, jit-initialised)
from prorl_jax.models import PRESETS  # noqa: E402
from prorl_jax.rollout import JaxSampler  # noqa: E402

H100_SXM_HBM_BYTES_PER_S = 3.35e12
PEER_TEMPERATURE = 1.2


def decode_step_bytes(cfg, batch: int, context: float, cache_bytes_per_value: int) -> dict:
    """Bytes one decode step must read: weights (no embedding table unless it is the tied
    head) and the KV cache of `batch` rows of `context` slots on average."""
    table = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    weights = (cfg.num_params() - table) * np.dtype(jnp.dtype(cfg.dtype)).itemsize
    kv = (batch * context * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
          * cache_bytes_per_value)
    return {"weight_bytes": weights, "kv_bytes": kv}


def bench_jax(args) -> dict:
    model = build_model(argparse.Namespace(
        preset=args.preset, checkpoint=args.checkpoint, dtype=args.dtype,
        param_dtype=args.dtype, remat="none", attention_impl="auto", seed=args.seed))
    cfg = model.config
    if args.batch % args.n:
        raise SystemExit(f"--batch={args.batch} must be a multiple of --n={args.n}")
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, cfg.vocab_size, (args.batch // args.n, args.prompt)).tolist()
    sampler = JaxSampler(model, max_prompt_len=args.prompt, max_new_tokens=args.new,
                         prompt_buckets=(args.prompt,), batch_buckets=(len(prompts),))
    request = dict(n=args.n, temperature=PEER_TEMPERATURE, top_p=1.0, max_new_tokens=args.new,
                   stop_token_ids=())
    start = time.perf_counter()
    sampler.generate(prompts, seed=args.seed, **request)
    warmup_s = time.perf_counter() - start
    runs = [sampler.generate(prompts, seed=args.seed + 1 + i, **request).timing
            for i in range(args.iters)]
    generate_s = statistics.median(r["generate_s"] for r in runs)
    decode_s = statistics.median(r["decode_s"] for r in runs)
    tokens = args.batch * args.new
    bytes_per_step = decode_step_bytes(cfg, args.batch, args.prompt + (args.new + 1) / 2,
                                       sampler.cache_dtype.itemsize)
    step_bytes = bytes_per_step["weight_bytes"] + bytes_per_step["kv_bytes"]
    roofline = args.batch / (step_bytes / args.hbm_bytes_per_s)
    return {"figure": "jax_sampler", "preset": None if args.checkpoint else args.preset,
            "batch": args.batch, "n": args.n, "prompt": args.prompt, "new_tokens": args.new,
            "dtype": cfg.dtype, "warmup_s": round(warmup_s, 3),
            "generate_s": round(generate_s, 4), "decode_s": round(decode_s, 4),
            "decode_step_ms": round(decode_s / args.new * 1e3, 3),
            "tokens_per_s": round(tokens / generate_s, 1),
            "decode_tokens_per_s": round(tokens / decode_s, 1),
            **bytes_per_step, "hbm_bytes_per_s": args.hbm_bytes_per_s,
            "roofline_tokens_per_s": round(roofline, 1),
            "fraction_of_roofline": float(f"{tokens / decode_s / roofline:.4g}"),
            "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "jax_version": jax.__version__}


def bench_peer(args) -> dict:
    """transformers' generate (the preset's family) on the same shape (random weights)."""
    import torch
    import transformers
    from torch_peer_train import hf_config, hf_model

    c = PRESETS[args.preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    model = hf_model(hf_config(args.preset)).to(device, dtype=getattr(torch, args.dtype))
    model.eval()
    prompt = torch.randint(0, c.vocab_size, (args.batch, args.prompt), device=device)
    kw = dict(do_sample=True, temperature=PEER_TEMPERATURE, top_p=1.0, top_k=0,
              max_new_tokens=args.new, min_new_tokens=args.new, eos_token_id=None,
              pad_token_id=0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        model.generate(prompt, **dict(kw, max_new_tokens=8, min_new_tokens=8))
        sync()
        start = time.perf_counter()
        out = model.generate(prompt, **kw)
        sync()
        seconds = time.perf_counter() - start
    new = (out.shape[1] - args.prompt) * args.batch
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"figure": "peer", "peer": "transformers+torch generate", "device": device,
            "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new,
            "s": round(seconds, 3), "tokens_per_s": round(new / seconds, 1),
            "torch_version": torch.__version__, "transformers_version": transformers.__version__}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="r1-distill-qwen-1.5b", choices=sorted(PRESETS))
    p.add_argument("--checkpoint", default=None, help="HF checkpoint dir (overrides --preset; "
                   "the peer still uses the preset's shape)")
    p.add_argument("--batch", type=int, default=64, help="decode rows (prompts x n)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt (share one prefill)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument("--new", type=int, default=512, help="generated tokens per row")
    p.add_argument("--dtype", default="bfloat16", help="compute, parameter and cache dtype")
    p.add_argument("--iters", type=int, default=2, help="timed generate calls (median)")
    p.add_argument("--hbm-bytes-per-s", type=float, default=H100_SXM_HBM_BYTES_PER_S)
    p.add_argument("--peer", action="store_true", help="also time transformers' generate")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = []
    if args.peer:  # first, so torch frees its GPU memory before JAX allocates its pool
        results.append(bench_peer(args))
        print(json.dumps(results[-1]), flush=True)
    results.append(bench_jax(args))
    print(json.dumps(results[-1]), flush=True)
    if args.peer:
        ratio = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
        results.append({"figure": "ratio", "jax_over_peer_tokens_per_s": round(ratio, 2)})
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
