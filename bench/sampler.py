"""Generation benchmark of the embedded JaxSampler, two workloads.

fixed (default): --batch rows = batch/n random prompts of --prompt tokens x --n samples, no stop
  ids, so every row generates exactly --new tokens; tokens/s next to the memory-bandwidth
  roofline and, with --peer, Hugging Face transformers' `generate` on the same shape in the
  same run (as /work/shared/bench/torch_peer.py does).
    python bench/sampler.py --preset r1-distill-qwen-1.5b --batch 64 --prompt 256 --new 512 --peer
    python bench/sampler.py --preset tiny --batch 4 --prompt 16 --new 16 --peer   # CPU smoke
long-tail: --prompts x --n rows (default 16 x 8 = 128) whose lengths follow a capped geometric
  law: the final RMSNorm scale is set to 0, so every next-token law is uniform over the V
  tokens (the layers still compute in full), and k stop ids end a row with probability k / V
  per step; k is chosen so that the mean length (1 - (1 - p)^cap) / p is --mean-len (default
  124, cap --new 512; a few rows reach the cap). The static and the continuous path run the
  same call with the same seed, so they generate the very same tokens (checked: same_tokens),
  interleaved over --iters timed calls after one warm-up call each.
    python bench/sampler.py --workload long-tail --preset tiny \\
        --shape hidden_size=256,intermediate_size=768,num_hidden_layers=4,vocab_size=1024
Figures per path: tokens/s (generated tokens / generate_s, prefill included; median), slot
utilisation (row-steps of rows still decoding / slot row-steps computed), KV bytes read per
generated token (the cache slots every decode step gathers) next to the minimum (the prompt and
earlier tokens each query needs), decode steps. Prints one JSON line per figure.

Roofline (fixed): a decode step must read every weight once (the LM head included, the
embedding table not: only B rows of it are gathered) plus each row's KV cache, on average
prompt + (new + 1) / 2 slots of L * 2 * K * D values:
  roofline_tokens_per_s = batch / ((weight_bytes + kv_bytes) / hbm_bytes_per_s),
with the H100 SXM figure 3.35e12 B/s by default (--hbm-bytes-per-s; H200: 4.8e12).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import build_model  # noqa: E402  (bench/forward.py: the model, jit-initialised)
from prorl_jax.models import PRESETS  # noqa: E402
from prorl_jax.rollout import JaxSampler  # noqa: E402
from prorl_jax.rollout.scheduler import BatchingConfig  # noqa: E402

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


def load_model(args):
    return build_model(argparse.Namespace(
        preset=args.preset, checkpoint=args.checkpoint, dtype=args.dtype,
        param_dtype=args.dtype, remat="none", attention_impl="auto", seed=args.seed,
        shape=args.shape))


def batching(args, mode: str) -> BatchingConfig:
    return BatchingConfig(mode=mode, decode_slots=args.slots if mode == "continuous" else 0,
                          block_size=args.block_size, chunk_steps=args.chunk_steps,
                          min_slots=args.min_slots)


def common(args, cfg) -> dict:
    return {"preset": None if args.checkpoint else args.preset, "shape": args.shape or None,
            "dtype": cfg.dtype, "device": str(jax.devices()[0].device_kind),
            "backend": jax.default_backend(), "jax_version": jax.__version__}


def bench_fixed(args) -> dict:
    model = load_model(args)
    cfg = model.config
    if args.batch % args.n:
        raise SystemExit(f"--batch={args.batch} must be a multiple of --n={args.n}")
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, cfg.vocab_size, (args.batch // args.n, args.prompt)).tolist()
    mode = "static" if args.batching == "static" else "continuous"
    sampler = JaxSampler(model, max_prompt_len=args.prompt, max_new_tokens=args.new,
                         prompt_buckets=(args.prompt,), batch_buckets=(len(prompts),),
                         batching=batching(args, mode))
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
    return {"figure": "jax_sampler", "batching": mode, **common(args, cfg),
            "batch": args.batch, "n": args.n, "prompt": args.prompt, "new_tokens": args.new,
            "warmup_s": round(warmup_s, 3), "generate_s": round(generate_s, 4),
            "decode_s": round(decode_s, 4),
            "decode_step_ms": round(decode_s / args.new * 1e3, 3),
            "tokens_per_s": round(tokens / generate_s, 1),
            "decode_tokens_per_s": round(tokens / decode_s, 1),
            **bytes_per_step, "hbm_bytes_per_s": args.hbm_bytes_per_s,
            "roofline_tokens_per_s": round(roofline, 1),
            "fraction_of_roofline": float(f"{tokens / decode_s / roofline:.4g}")}


def stop_ids_for_mean(vocab: int, mean_len: float, cap: int) -> list[int]:
    """The k highest token ids with (1 - (1 - k/V)^cap) / (k/V) closest to mean_len."""
    def mean(k):
        p = k / vocab
        return (1 - (1 - p) ** cap) / p
    k = min(range(1, vocab // 2), key=lambda k: abs(mean(k) - mean_len))
    return list(range(vocab - k, vocab))


def bench_long_tail(args) -> list[dict]:
    model = load_model(args)
    cfg = model.config
    model.norm.weight[...] = jnp.zeros_like(model.norm.weight[...])  # uniform next-token law
    stops = stop_ids_for_mean(cfg.vocab_size, args.mean_len, args.new)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, cfg.vocab_size - len(stops),
                           (args.prompts, args.prompt)).tolist()
    modes = ["static", "continuous"] if args.batching == "both" else [args.batching]
    samplers = {m: JaxSampler(model, max_prompt_len=args.prompt, max_new_tokens=args.new,
                              prompt_buckets=(args.prompt,), batch_buckets=(args.prompts,),
                              max_stop_ids=len(stops), batching=batching(args, m))
                for m in modes}
    request = dict(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.new,
                   stop_token_ids=stops, seed=args.seed)
    warmup, runs, tokens = {}, {m: [] for m in modes}, {}
    for m in modes:
        start = time.perf_counter()
        tokens[m] = samplers[m].generate(prompts, **request).token_ids
        warmup[m] = time.perf_counter() - start
    for _ in range(args.iters):  # interleaved, so both paths see the same machine load
        for m in modes:
            batch = samplers[m].generate(prompts, **request)
            runs[m].append((batch.timing["generate_s"], dict(samplers[m].last_stats)))
    lengths = np.array([len(t) for t in tokens[modes[0]]])
    out = []
    for m in modes:
        generate_s = statistics.median(r[0] for r in runs[m])
        st = runs[m][0][1]
        out.append({"figure": "long_tail", "batching": m, **common(args, cfg),
                    "rows": len(lengths), "prompts": args.prompts, "n": args.n,
                    "prompt": args.prompt, "cap": args.new, "stop_ids": len(stops),
                    "mean_len": round(float(lengths.mean()), 2),
                    "max_len": int(lengths.max()), "rows_at_cap": int((lengths == args.new).sum()),
                    "slots": st["slots"], "warmup_s": round(warmup[m], 2),
                    "generate_s": round(generate_s, 3),
                    "generate_s_all": [round(r[0], 3) for r in runs[m]],
                    "tokens_per_s": round(st["generated_tokens"] / generate_s, 1),
                    "slot_utilisation": round(st["slot_utilisation"], 4),
                    "decode_steps": st["decode_steps"],
                    "kv_bytes_read_per_token": round(st["kv_bytes_read_per_token"]),
                    "kv_bytes_min_per_token": round(st["kv_bytes_min_per_token"]),
                    "kv_read_over_min": round(st["kv_read_over_min"], 3),
                    "chunks": st.get("chunks"), "prompts_prefilled": st.get("prompts_prefilled")})
    if len(modes) == 2:
        static, cont = out
        out.append({"figure": "long_tail_ratio",
                    "same_tokens": tokens["static"] == tokens["continuous"],
                    "continuous_over_static_tokens_per_s": round(
                        cont["tokens_per_s"] / static["tokens_per_s"], 3),
                    "kv_read_static_over_continuous": round(
                        static["kv_bytes_read_per_token"] / cont["kv_bytes_read_per_token"], 3)})
    return out


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
    p.add_argument("--workload", default="fixed", choices=("fixed", "long-tail"))
    p.add_argument("--preset", default="r1-distill-qwen-1.5b", choices=sorted(PRESETS))
    p.add_argument("--shape", default="", help="preset field overrides, e.g. vocab_size=1024")
    p.add_argument("--checkpoint", default=None, help="HF checkpoint dir (overrides --preset; "
                   "the peer still uses the preset's shape)")
    p.add_argument("--batch", type=int, default=64, help="fixed: decode rows (prompts x n)")
    p.add_argument("--prompts", type=int, default=16, help="long-tail: prompts")
    p.add_argument("--n", type=int, default=None,
                   help="samples per prompt (default: 1 fixed, 8 long-tail)")
    p.add_argument("--prompt", type=int, default=None,
                   help="prompt tokens (default: 256 fixed, 64 long-tail)")
    p.add_argument("--new", type=int, default=512, help="generated tokens per row (the cap)")
    p.add_argument("--mean-len", type=float, default=124.0, help="long-tail: mean length")
    p.add_argument("--batching", default=None, choices=("static", "continuous", "both"),
                   help="default: continuous (fixed), both (long-tail)")
    p.add_argument("--slots", type=int, default=0,
                   help="continuous decode slots (0: one per row; long-tail default 32)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--chunk-steps", type=int, default=32)
    p.add_argument("--min-slots", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", help="compute, parameter and cache dtype")
    p.add_argument("--iters", type=int, default=2, help="timed generate calls (median)")
    p.add_argument("--hbm-bytes-per-s", type=float, default=H100_SXM_HBM_BYTES_PER_S)
    p.add_argument("--peer", action="store_true", help="fixed: also time transformers' generate")
    p.add_argument("--peer-only", action="store_true", help="fixed: time the peer alone")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    long_tail = args.workload == "long-tail"
    args.n = args.n or (8 if long_tail else 1)
    args.prompt = args.prompt or (64 if long_tail else 256)
    args.batching = args.batching or ("both" if long_tail else "continuous")
    if long_tail and not args.slots:
        args.slots = 32
    if not long_tail and args.batching == "both":
        raise SystemExit("--batching both is for --workload long-tail")
    return args


def main(argv=None, peer: Optional[dict] = None) -> list[dict]:
    """Runs the workload and prints one JSON line per figure; -> the figures. `peer`: the
    peer's figure measured earlier in another process (bench/gpu_suite.py)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.peer_only:
        figures = [bench_peer(args)]
    elif args.workload == "long-tail":
        figures = bench_long_tail(args)
    else:
        if args.peer and peer is None:  # first, so torch frees its GPU memory before JAX
            peer = bench_peer(args)
        figures = [peer] if peer else []
        figures.append(bench_fixed(args))
        if peer:
            figures.append({"figure": "ratio", "jax_over_peer_tokens_per_s": round(
                figures[1]["tokens_per_s"] / peer["tokens_per_s"], 2)})
    for figure in figures:
        print(json.dumps(figure), flush=True)
    return figures


if __name__ == "__main__":
    main()
