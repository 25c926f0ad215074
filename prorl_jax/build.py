"""Builds a run's parts from its config: tokenizer, model, data, rollout engine, reward scorer.

Each builder reads only the config fields it needs; the trainer composes them.
"""
from __future__ import annotations

import os
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from prorl_jax import config as config_lib
from prorl_jax import data as data_lib
from prorl_jax.models import PRESETS, CausalLM, init_model
from prorl_jax.rollout.base import RolloutConfig, RolloutEngine

DEMO_TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "assets", "demo_tokenizer")
SYNC_DTYPE = jnp.bfloat16  # the dtype the policy is written in for vLLM servers
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>")


def load_tokenizer(cfg):
    """The tokenizer: tokenizer_path, else model.path, else the shipped demo tokenizer."""
    from transformers import AutoTokenizer
    path = cfg.tokenizer_path or cfg.model.path or DEMO_TOKENIZER_DIR
    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path)
    try:  # a hub id: only from the local Hugging Face cache, never downloaded at run time
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(
            f"config.tokenizer_path / config.model.path: {path!r} is neither a directory nor a "
            f"hub id in the local Hugging Face cache ({e})") from None


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the chat end-of-turn tokens the tokenizer knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _STOP_TOKENS if t in vocab)
    if not ids:
        raise ValueError("tokenizer has no EOS token and none of "
                         f"{list(_STOP_TOKENS)}: cannot stop generation")
    return sorted(ids)


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return int(tokenizer.eos_token_id if pad is None else pad)


def build_model(cfg, tokenizer) -> CausalLM:
    """The policy: loaded from model.path (its family from config.json's model_type), or
    randomly initialised from model.preset (any family's preset, `prorl_jax.models.PRESETS`)."""
    m = cfg.model
    settings = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                    attention_impl=m.attention_impl)
    if m.path:
        from prorl_jax.models import load_pretrained
        path = m.path
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download  # local cache only
            path = snapshot_download(path, local_files_only=True)
        return load_pretrained(path, dtype=jnp.dtype(m.dtype),
                               param_dtype=jnp.dtype(m.param_dtype), remat=m.remat,
                               attention_impl=m.attention_impl)
    if m.preset not in PRESETS:
        raise config_lib.ConfigError(f"config.model.preset={m.preset!r}: expected one of "
                                     f"{sorted(PRESETS)}")
    if m.vocab_size:
        settings["vocab_size"] = len(tokenizer) if m.vocab_size < 0 else m.vocab_size
    preset = PRESETS[m.preset].replace(**settings)
    if len(tokenizer) > preset.vocab_size:
        raise config_lib.ConfigError(
            f"config.model.preset={m.preset!r} has vocab_size {preset.vocab_size} but the "
            f"tokenizer has {len(tokenizer)} tokens")
    return init_model(preset, seed=cfg.seed)


def _sources(cfg, field: str, toy_size: int, toy_seed: int):
    files = config_lib.parse_weighted_files(cfg.data[field], f"data.{field}")
    if files:
        return files
    if cfg.data.toy_task and toy_size > 0:
        from prorl_jax import toy_task
        return [(toy_task.make_records(cfg.data.toy_task, toy_size, toy_seed), 1.0)]
    return []


def build_datasets(cfg, tokenizer):
    """(train PromptDataset, validation PromptDataset or None)."""
    train_sources = _sources(cfg, "train_files", cfg.data.toy_train_size, cfg.seed)
    train = data_lib.PromptDataset(train_sources, tokenizer,
                                   max_prompt_tokens=cfg.data.max_prompt_tokens, seed=cfg.seed)
    if train.num_dropped:
        logging.warning("dropped %d prompts longer than data.max_prompt_tokens=%d: %s",
                        train.num_dropped, cfg.data.max_prompt_tokens,
                        train.num_dropped_by_source)
    val_sources = _sources(cfg, "val_files", cfg.data.toy_val_size, cfg.seed + 1_000_003)
    val = None
    if val_sources:
        val = data_lib.PromptDataset(val_sources, tokenizer,
                                     max_prompt_tokens=cfg.data.max_prompt_tokens, seed=cfg.seed)
    import rewards  # refuse at start-up what cannot be scored here (code without a sandbox)
    rewards.check_available(train.domains | (val.domains if val is not None else set()))
    return train, val


def uses_vllm(cfg) -> bool:
    """Whether the run's rollouts come from vLLM servers (else the embedded JaxSampler)."""
    r = RolloutConfig.from_config(cfg)
    return r.engine == "vllm" or (r.engine == "auto" and bool(r.urls))


def host_weights_dtype(cfg):
    """The dtype the asynchronous pipeline keeps host copies of weight versions in for an
    external engine (what its writer writes: SYNC_DTYPE for vLLM); None: the params' own."""
    return SYNC_DTYPE if uses_vllm(cfg) else None


def build_engine(cfg, model: CausalLM, mesh, *, pad_id: int, workdir: str,
                 max_new_tokens: int) -> RolloutEngine:
    """vLLM servers when rollout.vllm_urls is set (or engine="vllm"), else the JaxSampler
    (sized for `max_new_tokens`, the longest response of any stage; batching from
    rollout.batching, decode_slots, kv_cache_gb, kv_block_size, decode_chunk_steps,
    min_decode_slots)."""
    if uses_vllm(cfg):
        from prorl_jax.models import save_pretrained
        from prorl_jax.rollout import VLLMClient
        from prorl_jax.rollout.vllm_settings import VLLMSettings
        stages = config_lib.parse_stages(cfg)
        settings = VLLMSettings.from_config(
            cfg, [config_lib.stage_config(cfg, stages, i) for i in range(len(stages))],
            workdir=workdir)
        model_cfg = model.config

        def write(params, path):
            save_pretrained(params, path, config=model_cfg, dtype=SYNC_DTYPE)

        def make_client():
            return VLLMClient(base_urls=list(settings.urls), weights_dir=settings.weights_dir,
                              timeout_s=settings.timeout_s,
                              health_timeout_s=settings.health_timeout_s,
                              server_weights_dir=settings.server_weights_dir or None,
                              weight_writer=write)

        if jax.process_count() == 1:
            return make_client()
        # Several trainer processes: process 0 talks to the servers, all get the rollouts; the
        # others only take part in the gathers of the sharded weights while they are written.
        from prorl_jax.rollout.multihost import ProcessZeroEngine
        return ProcessZeroEngine(make_client,
                                 take_part_in_write=lambda params: write(params,
                                                                         settings.weights_dir))
    from prorl_jax.rollout import JaxSampler
    from prorl_jax.rollout.scheduler import BatchingConfig
    return JaxSampler(model, max_prompt_len=cfg.data.max_prompt_tokens,
                      max_new_tokens=max_new_tokens, pad_id=pad_id, mesh=mesh,
                      batching=BatchingConfig.from_config(cfg))


REASONING_TAGS = ("<think>", "</think>")


def scoring_drop_ids(tokenizer) -> frozenset[int]:
    """Token ids removed before scoring: every special token (EOS, end of turn, padding, any
    added token marked special), except the reasoning tags, which the verifiers need (the answer
    is what follows `</think>`) whether the tokenizer marks them special or not."""
    vocab = tokenizer.get_vocab()
    keep = {vocab[t] for t in REASONING_TAGS if t in vocab}
    special = set(tokenizer.all_special_ids)
    special.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return frozenset(special - keep)


class RewardScorer:
    """Decodes responses and scores them with `rewards.score_batch` in a worker pool it owns.

    Decoding drops the special tokens but keeps <think>/</think> (`scoring_drop_ids`), so a
    tokenizer whose reasoning tags are special tokens scores the same as one where they are
    plain added tokens (DeepSeek-R1-Distill's layout). Thread-safe: one call at a time uses
    the pool (the asynchronous pipeline scores in a thread of its own, validation in the
    trainer's)."""

    def __init__(self, cfg, tokenizer):
        import rewards
        self._rewards = rewards
        self.tokenizer = tokenizer
        self._drop_ids = scoring_drop_ids(tokenizer)
        self.think_mode = cfg.reward.think_mode
        self.timeout_s = cfg.reward.timeout_s
        self.pool = rewards.RewardPool(cfg.reward.num_workers or None)
        self.failures = 0
        self._lock = threading.Lock()

    def decode(self, response_ids: Sequence[Sequence[int]]) -> list[str]:
        """[n] response texts as the verifiers see them."""
        kept = [[int(t) for t in ids if int(t) not in self._drop_ids] for ids in response_ids]
        return self.tokenizer.batch_decode(kept, skip_special_tokens=False)

    def score_items(self, records: Sequence[dict], response_ids: Sequence[Sequence[int]]
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(rewards f32[N], failed bool[N]: the verifier crashed or timed out)."""
        texts = self.decode(response_ids)
        with self._lock:
            scores, details = self._rewards.score_batch(
                list(records), texts, think_mode=self.think_mode, timeout_s=self.timeout_s,
                return_details=True, pool=self.pool)
        failed = np.array([s in ("crash", "timeout") for s in details.status], bool)
        return np.asarray(scores, np.float32), failed

    def __call__(self, records: Sequence[dict], response_ids: Sequence[Sequence[int]]
                 ) -> np.ndarray:
        rewards, failed = self.score_items(records, response_ids)
        self.failures = int(failed.sum())
        return rewards

    def close(self) -> None:
        self.pool.close()
