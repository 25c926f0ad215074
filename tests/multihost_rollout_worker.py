"""Worker of tests/test_multihost_rollout.py: one of two jax.distributed processes that share a
vLLM server (the test double) through ProcessZeroEngine."""
import json
import os
import sys

import jax
import numpy as np
import safetensors.numpy


def main(coordinator: str, process_id: int, url: str, out_dir: str) -> None:
    jax.distributed.initialize(coordinator, 2, process_id)
    from prorl_jax.rollout import VLLMClient
    from prorl_jax.rollout.multihost import ProcessZeroEngine

    def writer(params, path):
        safetensors.numpy.save_file(params, os.path.join(path, "model.safetensors"))

    def take_part(params):
        with open(os.path.join(out_dir, f"took_part_{process_id}"), "w") as f:
            f.write(str(sorted(params)))

    engine = ProcessZeroEngine(
        lambda: VLLMClient([url], os.path.join(out_dir, "weights"), timeout_s=10.0,
                           health_timeout_s=10.0, weight_writer=writer),
        take_part_in_write=take_part)
    params = {"model.embed_tokens.weight": np.ones((2, 3), np.float32),  # the double's tensors
              "lm_head.weight": np.ones((3, 2), np.float32)}
    engine.update_weights(params, 1)
    batch = engine.generate([[1, 2, 3], [4, 5]], n=2, temperature=1.2, top_p=1.0,
                            max_new_tokens=5, stop_token_ids=[0], seed=3)
    with open(os.path.join(out_dir, f"batch_{process_id}.json"), "w") as f:
        json.dump({"token_ids": batch.token_ids,
                   "logprobs": [lp.tolist() for lp in batch.logprobs],
                   "finish_reasons": batch.finish_reasons}, f)
    engine.close()


def sampler_main(coordinator: str, process_id: int, out_dir: str) -> None:
    """Both processes sample with the embedded JaxSampler over one 2-process mesh."""
    if coordinator != "single":
        jax.distributed.initialize(coordinator, 2, process_id)
    from prorl_jax.models import PRESETS, init_model
    from prorl_jax.rollout.jax_sampler import JaxSampler
    from prorl_jax.rollout.scheduler import BatchingConfig
    from prorl_jax.sharding import MeshConfig, make_mesh
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    model = init_model(PRESETS["tiny"], 0)
    request = dict(n=2, temperature=1.2, top_p=1.0, max_new_tokens=6, stop_token_ids=[0],
                   seed=11)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    # 2 slots per shard for 8 rows: rows are admitted as others finish, on every host alike
    sampler = JaxSampler(model, max_prompt_len=8, max_new_tokens=6, mesh=mesh,
                         batching=BatchingConfig(decode_slots=4, block_size=4))
    batch = sampler.generate(prompts, **request)
    out = {"token_ids": batch.token_ids,
           "logprobs": [np.round(lp, 5).tolist() for lp in batch.logprobs]}
    if coordinator == "single":  # the static path of the same call, for the test to compare
        static = JaxSampler(model, max_prompt_len=8, max_new_tokens=6, mesh=mesh,
                            batching=BatchingConfig(mode="static"))
        out["static_token_ids"] = static.generate(prompts, **request).token_ids
    with open(os.path.join(out_dir, f"sampler_{process_id}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    if sys.argv[1] == "sampler":
        sampler_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
