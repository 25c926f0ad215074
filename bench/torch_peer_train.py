"""The peer for bench/train_step.py: the same GRPO iteration in transformers + torch.

What a PyTorch user runs (as shared/bench/torch_peer.py's train figure): the Hugging Face model
of the preset's family (Qwen2ForCausalLM for the 1.5B) at random init, bf16 weights, SDPA attention, gradient checkpointing, AdamW
(lr 2e-6); per iteration a no-grad old-policy pass and a no-grad reference pass, then the policy's
forward + backward on the clipped-ratio loss (eps 0.2 / 0.4) plus beta * k3 KL, and an optimizer
step. Runs on CUDA when available, else CPU (for the tiny smoke run). Prints one JSON line
(bench/train_step.py adds the MFU with its own FLOP count and measured matmul rate).

    python bench/torch_peer_train.py --preset r1-distill-qwen-1.5b --batch 4 --seq 4096
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prorl_jax.models import PRESETS, config_to_hf  # noqa: E402  (shapes only)


def hf_config(preset: str) -> transformers.PretrainedConfig:
    """The transformers config of a preset (any family, via its config.json), SDPA attention."""
    fields = config_to_hf(PRESETS[preset])
    for key in ("architectures", "torch_dtype", "dtype", "rope_scaling"):
        fields.pop(key)
    cfg = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    cfg._attn_implementation = "sdpa"
    return cfg


def hf_model(cfg: transformers.PretrainedConfig) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_config(cfg)


def sampled_logp(model, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits / 1.2)[next token], f32 [B, T-1]."""
    logits = model(input_ids=ids).logits[:, :-1].float() / 1.2
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="r1-distill-qwen-1.5b", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = hf_config(a.preset)
    policy = hf_model(cfg).to(dev, dtype=torch.bfloat16)
    reference = hf_model(cfg).to(dev, dtype=torch.bfloat16).eval()
    policy.gradient_checkpointing_enable()
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-6)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=dev)
    adv = torch.randn(a.batch, 1, device=dev)
    mask = torch.ones(a.batch, a.seq - 1, device=dev)

    def iteration():
        with torch.no_grad():
            old, ref = sampled_logp(policy, ids), sampled_logp(reference, ids)
        logp = sampled_logp(policy, ids)
        ratio = torch.exp(logp - old)
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.4))
        d = ref - logp
        loss = ((pg + 1e-4 * (torch.exp(d) - d - 1)) * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    iteration()
    sync()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(a.steps):
        iteration()
    sync()
    step_s = (time.perf_counter() - start) / a.steps
    if dev == "cuda":
        mem_gb, kind = torch.cuda.max_memory_allocated() / 2**30, "device_peak"
    else:
        mem_gb, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host_peak_rss"
    print(json.dumps(dict(figure="train_step", impl="transformers+torch", preset=a.preset,
                          batch=a.batch, seq=a.seq, device=dev, step_s=round(step_s, 4),
                          tokens_per_s=round(a.batch * a.seq / step_s, 1),
                          peak_mem_gb=round(mem_gb, 2), peak_mem_kind=kind)), flush=True)


if __name__ == "__main__":
    main()
