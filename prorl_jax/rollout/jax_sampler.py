"""The embedded JAX sampler: generates GRPO rollouts with the policy in device memory.

A call's P prompts x n samples are B = P * n rows (prompt-major: sample j of prompt i is row
i*n + j), batched one of two ways (`BatchingConfig.mode`):
  continuous (default; `continuous_batch.py`): a fixed number of decode slots (a config field
      or a KV-memory budget) over a paged KV pool; rows enter slots as others finish, each
      prompt is prefilled once per shard and its KV shared by its samples, attention reads only
      the blocks a row has filled. Memory is bounded by the slots, not by B.
  static (`static_batch.py`): every row in one batch, a dense cache of the maximum length, until
      the longest row is done.
Both sample a token per row with temperature and exact top-p (`sampling.py`), record its
processed log-prob, keep a stop id when hit, and use row r's key fold_in(fold_in(key(seed), r), t)
for its token t: the same seed gives the same samples whatever the batching, slot or sharding.
With a mesh, rows (and the KV pool) are sharded over the mesh's batch axes (default "data" and
"fsdp"); the parameters stay as given (e.g. the trainer's sharded fp32 master weights, cast to
the compute dtype inside the jitted functions; no copy to host). Every host runs the same
schedule and gets every row (multi-process meshes).
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prorl_jax.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutBatch, RolloutEngine
from prorl_jax.rollout.continuous_batch import ContinuousBatcher
from prorl_jax.rollout.scheduler import BatchingConfig
from prorl_jax.rollout.static_batch import StaticBatcher

DEFAULT_BATCH_AXES = ("data", "fsdp")
MIN_PROMPT_BUCKET = 16


def default_prompt_buckets(max_prompt_len: int) -> tuple[int, ...]:
    """Powers of two from 16 below max_prompt_len, then max_prompt_len itself."""
    buckets, b = [], MIN_PROMPT_BUCKET
    while b < max_prompt_len:
        buckets.append(b)
        b *= 2
    return tuple(buckets) + (max_prompt_len,)


def pick_bucket(size: int, buckets: Optional[Sequence[int]], field: str) -> int:
    """The smallest bucket >= size; with buckets None, the next power of two >= size."""
    if buckets is None:
        return 1 << max(0, math.ceil(math.log2(max(size, 1))))
    fitting = [b for b in buckets if b >= size]
    if not fitting:
        raise ValueError(f"{field}: {size} exceeds the largest bucket {max(buckets)} "
                         f"(buckets {sorted(buckets)})")
    return min(fitting)


def left_pad(prompts: Sequence[Sequence[int]], num_rows: int, length: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids int32[num_rows, length] left-padded with pad_id, lens int32[num_rows]).

    Rows beyond len(prompts) are filler: one pad token (length 1) so their positions are valid.
    """
    ids = np.full((num_rows, length), pad_id, np.int32)
    lens = np.ones((num_rows,), np.int32)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt):] = prompt
        lens[i] = len(prompt)
    return ids, lens


class JaxSampler(RolloutEngine):
    """Samples rollouts with a causal LM held in (possibly sharded) device memory.

    model: any `prorl_jax.models.CausalLM` (its parameters are the initial policy).
    max_prompt_len / max_new_tokens: the longest prompt and response a call may ask for.
    pad_id: token id written in padding slots (never attended to).
    prompt_buckets: prompt lengths compiled for (default: 16, 32, ... up to max_prompt_len).
    batch_buckets: prompt counts compiled for (default: powers of two): the static path's rows
        and the continuous path's slots (without a slot limit) are the bucket x n.
    mesh / batch_axes: shard the batch over these mesh axes (those present in the mesh).
    cache_dtype: KV-cache dtype (default: the model's compute dtype).
    max_stop_ids: the most stop ids a call may pass (they are padded to this fixed size).
    batching: a `BatchingConfig` (default: continuous, one slot per row, 16-token blocks).
    After each call `last_stats` holds its figures: decode_steps, slots, slot_steps (slot
    row-steps computed), live_row_steps (row-steps of rows still decoding), slot_utilisation
    (live / computed), kv_slots_read (cache slots the decode steps gathered), kv_slots_min (those
    the queries needed: the prompt and the earlier tokens, per generated token), prefill_s.
    """

    def __init__(self, model, *, max_prompt_len: int, max_new_tokens: int, pad_id: int = 0,
                 prompt_buckets: Optional[Sequence[int]] = None,
                 batch_buckets: Optional[Sequence[int]] = None, mesh: Optional[Mesh] = None,
                 batch_axes: Sequence[str] = DEFAULT_BATCH_AXES, cache_dtype: Any = None,
                 max_stop_ids: int = 8, batching: BatchingConfig = BatchingConfig()):
        cfg = model.config
        for name, value in (("max_prompt_len", max_prompt_len),
                            ("max_new_tokens", max_new_tokens), ("max_stop_ids", max_stop_ids)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"JaxSampler.{name} must be a positive int, got {value!r}")
        if not 0 <= pad_id < cfg.vocab_size:
            raise ValueError(f"JaxSampler.pad_id={pad_id} must be in [0, vocab={cfg.vocab_size})")
        if max_prompt_len + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"JaxSampler: max_prompt_len + max_new_tokens = "
                             f"{max_prompt_len + max_new_tokens} exceeds the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        self.config = cfg
        self.max_prompt_len, self.max_new_tokens = max_prompt_len, max_new_tokens
        self.pad_id, self.max_stop_ids = pad_id, max_stop_ids
        self.prompt_buckets = tuple(sorted(prompt_buckets
                                           or default_prompt_buckets(max_prompt_len)))
        if max(self.prompt_buckets) < max_prompt_len:
            raise ValueError(f"JaxSampler.prompt_buckets {self.prompt_buckets} must reach "
                             f"max_prompt_len={max_prompt_len}")
        self.batch_buckets = None if batch_buckets is None else tuple(sorted(batch_buckets))
        self.compute_dtype = jnp.dtype(cfg.dtype)
        self.cache_dtype = self.compute_dtype if cache_dtype is None else jnp.dtype(cache_dtype)
        self.mesh = mesh
        self.batch_axes = self._resolve_batch_axes(mesh, batch_axes)
        self.num_batch_shards = (1 if mesh is None else
                                 int(np.prod([mesh.shape[a] for a in self.batch_axes])))
        self.batching = batching
        self._graphdef, params, self._rest = nnx.split(model, nnx.Param, ...)
        self._params = self._place(params)
        self.weight_version = 0
        self.last_decode_steps = 0  # decode-loop iterations of the latest call (early exit)
        self.last_stats: dict = {}
        self.trace_counts = {"prefill": 0, "decode": 0, "paged_prefill": 0, "chunk": 0}
        self.static = StaticBatcher(self)
        self.continuous = ContinuousBatcher(self)

    # -- weights --------------------------------------------------------------------------------

    @staticmethod
    def _resolve_batch_axes(mesh, batch_axes) -> tuple[str, ...]:
        if mesh is None:
            return ()
        axes = tuple(a for a in batch_axes if a in mesh.axis_names)
        if not axes:
            raise ValueError(f"JaxSampler.batch_axes={tuple(batch_axes)}: none is an axis of the "
                             f"mesh (axes {mesh.axis_names})")
        return axes

    def _place(self, params):
        """Replicates onto the mesh any leaf not on the mesh's devices (device to device)."""
        if self.mesh is None:
            return params
        mesh_devices = set(self.mesh.devices.flat)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda x: x if set(x.devices()) == mesh_devices
                            else jax.device_put(x, replicated), params)

    def update_weights(self, params_or_model: Any, version: int) -> None:
        """Samples from these weights from now on: an `nnx.State` of the model's nnx.Param
        (any float dtype, any sharding) or a model of the same structure. The sampler keeps a
        reference, not a copy (leaves off the mesh are replicated onto it, device to device):
        a train step that donates these buffers must be followed by another update_weights."""
        if isinstance(params_or_model, nnx.Module):
            _, params, _ = nnx.split(params_or_model, nnx.Param, ...)
        else:
            params = params_or_model
        old_paths = jax.tree_util.tree_flatten_with_path(self._params)[0]
        new_paths = jax.tree_util.tree_flatten_with_path(params)[0]
        old = {jax.tree_util.keystr(p): x.shape for p, x in old_paths}
        new = {jax.tree_util.keystr(p): np.shape(x) for p, x in new_paths}
        if old != new:
            diff = sorted(set(old.items()) ^ set(new.items()))[:4]
            raise ValueError(f"update_weights: parameters do not match the sampler's model "
                             f"(path, shape) differences, first few: {diff}")
        self._params = self._place(params)
        self.weight_version = int(version)

    # -- what the batchers use ------------------------------------------------------------------

    @property
    def params(self):
        return self._params

    def model_with(self, params):
        """The model rebuilt inside jit with its parameters cast to the compute dtype."""
        dt = self.compute_dtype
        params = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating)
                              else x, params)
        return nnx.merge(self._graphdef, params, self._rest)

    def shard_batch(self, x, batch_dim: int = 0):
        """Constrains x's batch dimension to the mesh's batch axes (no-op without a mesh)."""
        if self.mesh is None:
            return x
        spec = PartitionSpec(*([None] * batch_dim), self.batch_axes)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def put_batch(self, x: np.ndarray):
        """Host array -> device, its leading (batch) dimension sharded over the batch axes."""
        if self.mesh is None:
            return jnp.asarray(x)
        spec = PartitionSpec(self.batch_axes, *([None] * (x.ndim - 1)))
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def fetch(self, out):
        """Device outputs -> host numpy; rows on several hosts are gathered to every host."""
        if jax.process_count() > 1:
            out = multihost_utils.process_allgather(out, tiled=True)
        return jax.device_get(out)

    def prompt_bucket(self, longest: int) -> int:
        return pick_bucket(longest, self.prompt_buckets,
                           "generate: longest prompt (prompt_buckets)")

    def prompt_count_bucket(self, num_prompts: int, per_shard: bool = False) -> int:
        """The batch bucket of a prompt count (static path rows, continuous slots / n),
        rounded up to a multiple of the shards; per_shard: the bucket alone (prefill rows)."""
        rows = pick_bucket(num_prompts, self.batch_buckets,
                           "generate: prompt count (batch_buckets)")
        return rows if per_shard else -(-rows // self.num_batch_shards) * self.num_batch_shards

    def left_pad(self, prompts, num_rows: int, length: int):
        return left_pad(prompts, num_rows, length, self.pad_id)

    @property
    def kv_bytes_per_slot(self) -> int:
        """Bytes of one cached token: L layers x (k, v) x K heads x D x itemsize."""
        c = self.config
        return (c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim
                * self.cache_dtype.itemsize)

    # -- the engine interface -------------------------------------------------------------------

    def _check_request(self, prompts, n, temperature, top_p, max_new_tokens, stop_token_ids):
        vocab = self.config.vocab_size
        if len(prompts) == 0:
            raise ValueError("generate: prompts is empty; expected at least one token-id list")
        for i, prompt in enumerate(prompts):
            if not 1 <= len(prompt) <= self.max_prompt_len:
                raise ValueError(f"generate: prompts[{i}] has {len(prompt)} tokens; expected 1 to "
                                 f"max_prompt_len={self.max_prompt_len}")
            ids = np.asarray(prompt)
            if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= vocab:
                raise ValueError(f"generate: prompts[{i}] must hold integer token ids in "
                                 f"[0, vocab={vocab})")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"generate: n must be a positive int, got {n!r}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), "
                             f"got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"generate: max_new_tokens must be an int in [1, "
                             f"{self.max_new_tokens}] (the sampler's max_new_tokens), "
                             f"got {max_new_tokens!r}")
        if len(stop_token_ids) > self.max_stop_ids:
            raise ValueError(f"generate: {len(stop_token_ids)} stop_token_ids, more than "
                             f"max_stop_ids={self.max_stop_ids}")
        for t in stop_token_ids:
            if not 0 <= int(t) < vocab:
                raise ValueError(f"generate: stop token id {t} is not in [0, vocab={vocab})")

        self.prompt_count_bucket(len(prompts))  # the prompt count must fit a batch bucket

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, temperature: float,
                 top_p: float, max_new_tokens: int, stop_token_ids: Sequence[int] = (),
                 seed: int = 0) -> RolloutBatch:
        """n samples per prompt; see the module docstring and `RolloutBatch`."""
        stop_token_ids = tuple(stop_token_ids or ())
        self._check_request(prompts, n, temperature, top_p, max_new_tokens, stop_token_ids)
        start = time.perf_counter()
        stop_ids = np.full((self.max_stop_ids,), -1, np.int32)
        stop_ids[:len(stop_token_ids)] = stop_token_ids
        batcher = self.static if self.batching.mode == "static" else self.continuous
        tokens, logps, stopped, stats = batcher.generate(
            prompts, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            stop_ids=stop_ids, seed=seed)
        generate_s = time.perf_counter() - start
        self.last_decode_steps = stats["decode_steps"]
        self.last_stats = finish_stats(stats, prompts, n, tokens, self.kv_bytes_per_slot)
        return RolloutBatch(
            prompt_ids=[list(map(int, p)) for p in prompts], token_ids=tokens, logprobs=logps,
            finish_reasons=[FINISH_STOP if s else FINISH_LENGTH for s in stopped],
            n=n, weight_version=self.weight_version,
            timing={"generate_s": generate_s, "prefill_s": stats["prefill_s"],
                    "decode_s": generate_s - stats["prefill_s"]})


def finish_stats(stats: dict, prompts, n: int, tokens, bytes_per_slot: int) -> dict:
    """Adds a call's derived figures to the batcher's: generated tokens, the KV slots the
    queries need at least (token t of a row whose prompt has m tokens attends m + t slots),
    slot utilisation, KV bytes read and needed per generated token."""
    lengths = np.array([len(t) for t in tokens], np.int64)
    prompt_lens = np.repeat([len(p) for p in prompts], n)
    kv_min = int(np.sum(lengths * prompt_lens + lengths * (lengths - 1) // 2))
    generated = int(lengths.sum())
    live = stats.get("live_row_steps", generated)
    return dict(stats, generated_tokens=generated, live_row_steps=live, kv_slots_min=kv_min,
                slot_utilisation=live / max(stats["slot_steps"], 1),
                kv_read_over_min=stats["kv_slots_read"] / max(kv_min, 1),
                kv_bytes_read_per_token=stats["kv_slots_read"] * bytes_per_slot
                / max(generated, 1),
                kv_bytes_min_per_token=kv_min * bytes_per_slot / max(generated, 1))
