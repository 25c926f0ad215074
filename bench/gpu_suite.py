"""Every GPU figure the project owes, in one process, into one JSON file (run by gpu_suite.sh).

Figures (the 1.5B shape, random weights: nothing is downloaded):
  peer_train      transformers + torch, the GRPO iteration on 4 x 4096 (bench/torch_peer_train.py,
                  which follows shared/bench/torch_peer.py's train figure)
  peer_generate   transformers' generate, 64 rows x (256 prompt + 512 new) tokens
  forward         jitted logits over 4 x 4096 (bench/forward.py)
  train_step      the GRPO iteration on 4 x 4096, and its ratio to peer_train (bench/train_step.py)
  fit_16k         the same iteration on 1 x 16384 tokens: it fits, and its peak memory
  sampler_64      the embedded sampler on the peer's shape, and its ratio to peer_generate
  sampler_256     256 rows x (256 + 512) against the HBM roofline
  long_tail       128 rows (16 prompts x 8), lengths averaging ~124 to the 512 cap, static and
                  continuous batching in the same run (bench/sampler.py --workload long-tail)
The torch peers run first, each in its own process, so that JAX (which then takes most of the
GPU's memory) does not starve them. After each figure the JSON file is rewritten (atomically),
so a run cut short keeps what it measured; a figure that fails records its error and the others
still run; a figure that would start after --budget-s is recorded as skipped.

    python bench/gpu_suite.py --out bench/results/gpu_suite.json            # on the GPU
    python bench/gpu_suite.py --smoke --out /tmp/suite.json                  # tiny, on CPU
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# name -> (full-size arguments, smoke arguments); {hbm} is --hbm-bytes-per-s
PRESET = ["--preset", "r1-distill-qwen-1.5b"]
SMOKE = ["--preset", "tiny"]
FIGURES = {
    "forward": (PRESET + ["--batch", "4", "--seq", "4096", "--dtype", "bfloat16"],
                SMOKE + ["--batch", "2", "--seq", "64", "--dtype", "float32", "--iters", "2"]),
    "train_step": (PRESET + ["--batch", "4", "--seq", "4096", "--steps", "3"],
                   SMOKE + ["--batch", "2", "--seq", "64", "--steps", "2"]),
    "fit_16k": (PRESET + ["--batch", "1", "--seq", "16384", "--steps", "2"],
                SMOKE + ["--batch", "1", "--seq", "256", "--steps", "1"]),
    "sampler_64": (PRESET + ["--batch", "64", "--prompt", "256", "--new", "512", "--iters", "1",
                             "--hbm-bytes-per-s", "{hbm}"],
                   SMOKE + ["--batch", "8", "--prompt", "16", "--new", "32", "--iters", "1",
                            "--dtype", "float32", "--hbm-bytes-per-s", "{hbm}"]),
    "sampler_256": (PRESET + ["--batch", "256", "--prompt", "256", "--new", "512", "--iters",
                              "1", "--hbm-bytes-per-s", "{hbm}"],
                    SMOKE + ["--batch", "16", "--prompt", "16", "--new", "32", "--iters", "1",
                             "--dtype", "float32", "--hbm-bytes-per-s", "{hbm}"]),
    "long_tail": (PRESET + ["--workload", "long-tail", "--iters", "1", "--slots", "32",
                            "--min-slots", "32"],
                  SMOKE + ["--workload", "long-tail", "--iters", "1", "--prompts", "4", "--n",
                           "4", "--prompt", "16", "--new", "64", "--mean-len", "16", "--slots",
                           "4", "--dtype", "float32"]),
}


def run_peer(script_args: list[str], timeout_s: float) -> dict:
    """A torch peer in a fresh process (JAX kept off the GPU there); its last JSON line."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable] + script_args, capture_output=True, text=True,
                         env=env, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(script_args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_atomic(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


class Suite:
    """Runs figures in order under a time budget, recording results, errors and skips."""

    def __init__(self, args):
        self.args, self.start = args, time.perf_counter()
        self.doc = {"suite": "gpu_suite", "smoke": args.smoke, "started": time.strftime(
            "%Y-%m-%dT%H:%M:%S"), "budget_s": args.budget_s, "figures": {}, "goals": {}}

    def run(self, name: str, fn) -> object:
        elapsed = time.perf_counter() - self.start
        if elapsed > self.args.budget_s:
            self.doc["figures"][name] = {"skipped": f"time budget: {elapsed:.0f} s elapsed"}
            result = None
        else:
            begin = time.perf_counter()
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # the figures go to the JSON
                    result = fn()
                self.doc["figures"][name] = {"result": result}
            except Exception as err:  # noqa: BLE001 - record and go on to the next figure
                result = None
                self.doc["figures"][name] = {"error": f"{type(err).__name__}: {err}",
                                             "traceback": traceback.format_exc()[-4000:]}
            self.doc["figures"][name]["wall_s"] = round(time.perf_counter() - begin, 1)
        print(json.dumps({name: self.doc["figures"][name]})[:2000], flush=True)
        self.doc["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        write_atomic(self.args.out, self.doc)
        return result


def figure_args(name: str, args) -> list[str]:
    full, smoke = FIGURES[name]
    return [a.replace("{hbm}", str(args.hbm_bytes_per_s)) for a in (smoke if args.smoke
                                                                     else full)]


def goals(doc: dict) -> dict:
    """The issue's goals next to what was measured (None where a figure is missing)."""
    def get(name, figure, key, **match):
        for item in doc["figures"].get(name, {}).get("result") or []:
            if item.get("figure") == figure and all(item.get(k) == v for k, v in match.items()):
                return item.get(key)
        return None

    return {
        "update_over_peer_tokens_per_s (goal >= 1.5)": get(
            "train_step", "ratio", "tokens_per_s_ours_over_peer"),
        "fit_16k_peak_mem_gb (goal: fits)": get("fit_16k", "train_step", "peak_mem_gb"),
        "sampler_over_hf_generate (goal >= 20)": get("sampler_64", "ratio",
                                                     "jax_over_peer_tokens_per_s"),
        "sampler_256_fraction_of_roofline (goal >= 0.5)": get(
            "sampler_256", "jax_sampler", "fraction_of_roofline"),
        "long_tail_continuous_over_static_tokens_per_s": get(
            "long_tail", "long_tail_ratio", "continuous_over_static_tokens_per_s"),
        "long_tail_slot_utilisation": get("long_tail", "long_tail", "slot_utilisation",
                                          batching="continuous"),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the JSON file of figures")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU): checks the suite")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="start no figure after this many seconds")
    p.add_argument("--hbm-bytes-per-s", type=float, default=4.8e12, help="H200: 4.8e12")
    p.add_argument("--peer-timeout-s", type=float, default=240.0)
    args = p.parse_args(argv)
    suite = Suite(args)
    import forward
    import sampler
    import train_step
    train_args = figure_args("train_step", args)
    ta = train_step.parse_args(train_args)
    peer_train = suite.run("peer_train", lambda: run_peer(
        [os.path.join(HERE, "torch_peer_train.py"), "--preset", ta.preset, "--batch",
         str(ta.batch), "--seq", str(ta.seq), "--steps", str(ta.steps)], args.peer_timeout_s))
    peer_generate = suite.run("peer_generate", lambda: run_peer(
        [os.path.join(HERE, "sampler.py"), "--peer-only"] + figure_args("sampler_64", args),
        args.peer_timeout_s))
    import jax
    suite.doc["device"] = str(jax.devices()[0].device_kind)
    suite.doc["jax_version"] = jax.__version__
    suite.run("forward", lambda: forward.main(figure_args("forward", args)))
    suite.run("train_step", lambda: train_step.main(train_args + ["--peer"] * bool(peer_train),
                                                    peer=peer_train))
    suite.run("fit_16k", lambda: train_step.main(figure_args("fit_16k", args)))
    suite.run("sampler_64", lambda: sampler.main(figure_args("sampler_64", args),
                                                 peer=peer_generate))
    suite.run("sampler_256", lambda: sampler.main(figure_args("sampler_256", args)))
    suite.run("long_tail", lambda: sampler.main(figure_args("long_tail", args)))
    suite.doc["goals"] = goals(suite.doc)
    write_atomic(args.out, suite.doc)
    print(json.dumps({"goals": suite.doc["goals"], "out": args.out,
                      "elapsed_s": suite.doc["elapsed_s"]}), flush=True)
    return suite.doc


if __name__ == "__main__":
    main()
