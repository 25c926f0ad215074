"""The embedded JAX sampler: generates GRPO rollouts with the policy in device memory.

Per `generate` call (P prompts, n samples each, B = P_bucket * n decode rows):
  1. Left-pad the prompts to a length bucket Tb (positions count from each prompt's first real
     token; padding slots are masked out) and pad the prompt count to a batch bucket P_bucket,
     so a jitted shape is reused across steps: compilation happens once per
     (Tb, P_bucket, n, max_new_tokens).
  2. Prefill [P_bucket, Tb] once, then repeat each prompt's KV cache and last logits n times
     (prompt-major rows: sample j of prompt i is row i*n + j) into a preallocated cache of
     S_max = Tb + max_new_tokens slots, one buffer per layer so each step updates it in place.
  3. A jitted `lax.while_loop` samples a token per row (temperature, exact top-p; see
     `sampling.py`), records its processed log-prob, feeds it back through the cached decoder and
     stops when every row has emitted a stop id (which is kept) or max_new_tokens.
RNG: row r's token at step t uses fold_in(fold_in(key(seed), r), t): samples of one prompt
differ, and the same seed reproduces them whatever the padding or sharding.
With a mesh, the batch dimension of prompts, cache and tokens is sharded over the mesh's batch
axes (default "data" and "fsdp"); the parameters stay as given (e.g. the trainer's sharded fp32
master weights, cast to the compute dtype inside the jitted functions; no copy to host).
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

from prorl_jax.models.kv_cache import DenseKVCache
from prorl_jax.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutBatch, RolloutEngine
from prorl_jax.rollout.sampling import sample_tokens

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


def _decode_step(model, token_ids, positions, cache: DenseKVCache):
    """One decode step: token_ids, positions int32[B, 1] written at the cache's per-row index.
    Returns (next-token logits f32[B, V], cache)."""
    hidden, cache = model.decode(token_ids, positions, cache)
    return model.logits(hidden)[:, 0], cache


class JaxSampler(RolloutEngine):
    """Samples rollouts with a causal LM held in (possibly sharded) device memory.

    model: any `prorl_jax.models.CausalLM` (its parameters are the initial policy).
    max_prompt_len / max_new_tokens: the longest prompt and response a call may ask for.
    pad_id: token id written in padding slots (never attended to).
    prompt_buckets: prompt lengths compiled for (default: 16, 32, ... up to max_prompt_len).
    batch_buckets: prompt counts compiled for (default: powers of two).
    mesh / batch_axes: shard the batch over these mesh axes (those present in the mesh).
    cache_dtype: KV-cache dtype (default: the model's compute dtype).
    max_stop_ids: the most stop ids a call may pass (they are padded to this fixed size).
    """

    def __init__(self, model, *, max_prompt_len: int, max_new_tokens: int, pad_id: int = 0,
                 prompt_buckets: Optional[Sequence[int]] = None,
                 batch_buckets: Optional[Sequence[int]] = None, mesh: Optional[Mesh] = None,
                 batch_axes: Sequence[str] = DEFAULT_BATCH_AXES, cache_dtype: Any = None,
                 max_stop_ids: int = 8):
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
        self._graphdef, params, self._rest = nnx.split(model, nnx.Param, ...)
        self._params = self._place(params)
        self.weight_version = 0
        self.last_decode_steps = 0  # decode-loop iterations of the latest call (early exit)
        self.trace_counts = {"prefill": 0, "decode": 0}
        self._prefill_jit = jax.jit(self._prefill, static_argnames=("n", "max_new_tokens"))
        # the prefill's cache is donated to the decode loop, which updates it in place
        self._decode_jit = jax.jit(self._decode, static_argnames=("prompt_len",),
                                   donate_argnames=("ks", "vs"))

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

    def _model(self, params):
        """The model rebuilt inside jit with its parameters cast to the compute dtype."""
        dt = self.compute_dtype
        params = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating)
                              else x, params)
        return nnx.merge(self._graphdef, params, self._rest)

    def _shard_batch(self, x, batch_dim: int = 0):
        """Constrains x's batch dimension to the mesh's batch axes (no-op without a mesh)."""
        if self.mesh is None:
            return x
        spec = PartitionSpec(*([None] * batch_dim), self.batch_axes)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    # -- jitted phases --------------------------------------------------------------------------

    def _prefill(self, params, prompt_ids, prompt_lens, *, n: int, max_new_tokens: int):
        """prompt_ids int32[P, Tb] (left-padded), prompt_lens int32[P] ->
        (logits f32[P*n, V], ks, vs: L-tuples of [P*n, Tb + max_new_tokens, K, D],
         kv_valid bool[P*n, Tb + max_new_tokens])."""
        self.trace_counts["prefill"] += 1
        model = self._model(params)
        num_prompts, prompt_len = prompt_ids.shape
        slots = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
        first_slot = (prompt_len - prompt_lens)[:, None]
        valid = slots >= first_slot
        positions = jnp.maximum(slots - first_slot, 0)
        cache = model.init_cache(num_prompts, prompt_len, dtype=self.cache_dtype)
        hidden, cache = model.decode(prompt_ids, positions, cache.replace(valid=valid))
        logits = model.logits(hidden[:, -1:])[:, 0]

        def expand(x, fill=0):  # [P, Tb, ...] -> [P*n, Tb + max_new, ...], prompt-major rows
            pad = [(0, 0), (0, max_new_tokens)] + [(0, 0)] * (x.ndim - 2)
            return self._shard_batch(jnp.repeat(jnp.pad(x, pad, constant_values=fill), n, axis=0))

        ks = tuple(expand(k) for k in cache.k)
        vs = tuple(expand(v) for v in cache.v)
        # generated slots are valid once written; causality hides the later ones
        return (self._shard_batch(jnp.repeat(logits, n, axis=0)), ks, vs, expand(valid, True))

    def _decode(self, params, logits, ks, vs, kv_valid, prompt_lens, row_ids, done, stop_ids,
                sampling, seed, *, prompt_len: int):
        """The decode loop. logits f32[B, V]; prompt_lens int32[B]; row_ids int32[B] (global
        sample index, the RNG stream); done bool[B] (True for filler rows); stop_ids int32[S]
        (-1 = unused); sampling f32[2] = (temperature, top_p); seed uint32 scalar.
        Returns ((tokens int32[B, M], logprobs f32[B, M], lengths int32[B], stopped bool[B],
        steps int32), (ks, vs)) with M = max_new_tokens = the cache's free slots (entries past
        lengths are junk); the final cache is returned so the donated one is reused in place."""
        self.trace_counts["decode"] += 1
        model = self._model(params)
        batch, cache_len = kv_valid.shape
        max_new = cache_len - prompt_len
        temperature, top_p = sampling[0], sampling[1]
        base_key = jax.random.key(seed)
        row_keys = jax.vmap(lambda r: jax.random.fold_in(base_key, r))(row_ids)

        def body(state):
            step, tokens, logps, lengths, done, stopped, logits, ks, vs = state
            keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
            token, token_logp = sample_tokens(keys, logits, temperature, top_p)
            active = ~done
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
            logps = jax.lax.dynamic_update_slice(logps, token_logp[:, None], (0, step))
            lengths = lengths + active.astype(jnp.int32)
            hit_stop = active & jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
            stopped = stopped | hit_stop
            done = done | hit_stop | (step + 1 >= max_new)
            index = jnp.full((batch,), prompt_len + step, jnp.int32)
            cache = _decode_step(model, token[:, None], (prompt_lens + step)[:, None],
                                 DenseKVCache(ks, vs, index, kv_valid))
            logits, ks, vs = cache[0], cache[1].k, cache[1].v
            return (step + 1, tokens, logps, lengths, done, stopped,
                    self._shard_batch(logits), ks, vs)

        def cond(state):
            return (state[0] < max_new) & ~jnp.all(state[4])

        init = (jnp.int32(0), self._shard_batch(jnp.zeros((batch, max_new), jnp.int32)),
                self._shard_batch(jnp.zeros((batch, max_new), jnp.float32)),
                jnp.zeros((batch,), jnp.int32), done, jnp.zeros((batch,), bool), logits, ks, vs)
        step, tokens, logps, lengths, _, stopped, _, ks, vs = jax.lax.while_loop(cond, body, init)
        return (tokens, logps, lengths, stopped, step), (ks, vs)

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

    def _put_batch(self, x: np.ndarray):
        """Host array -> device, its leading (batch) dimension sharded over the batch axes."""
        if self.mesh is None:
            return jnp.asarray(x)
        spec = PartitionSpec(self.batch_axes, *([None] * (x.ndim - 1)))
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, temperature: float,
                 top_p: float, max_new_tokens: int, stop_token_ids: Sequence[int] = (),
                 seed: int = 0) -> RolloutBatch:
        """n samples per prompt; see the module docstring and `RolloutBatch`."""
        stop_token_ids = tuple(stop_token_ids or ())
        self._check_request(prompts, n, temperature, top_p, max_new_tokens, stop_token_ids)
        start = time.perf_counter()
        num_prompts = len(prompts)
        prompt_len = pick_bucket(max(len(p) for p in prompts), self.prompt_buckets,
                                 "generate: longest prompt (prompt_buckets)")
        shards = self.num_batch_shards
        num_rows = pick_bucket(num_prompts, self.batch_buckets, "generate: prompt count "
                               "(batch_buckets)")
        num_rows = -(-num_rows // shards) * shards
        ids, lens = left_pad(prompts, num_rows, prompt_len, self.pad_id)
        logits, ks, vs, kv_valid = self._prefill_jit(
            self._params, self._put_batch(ids), self._put_batch(lens), n=n,
            max_new_tokens=max_new_tokens)
        jax.block_until_ready(logits)
        prefill_s = time.perf_counter() - start

        batch = num_rows * n
        stop_ids = np.full((self.max_stop_ids,), -1, np.int32)
        stop_ids[:len(stop_token_ids)] = stop_token_ids
        out, _ = self._decode_jit(
            self._params, logits, ks, vs, kv_valid, self._put_batch(np.repeat(lens, n)),
            self._put_batch(np.arange(batch, dtype=np.int32)),
            self._put_batch(np.arange(batch) >= num_prompts * n), jnp.asarray(stop_ids),
            jnp.asarray([temperature, top_p], jnp.float32),
            jnp.asarray(seed % 2**32, jnp.uint32), prompt_len=prompt_len)
        if jax.process_count() > 1:  # rows live on several hosts: every host gets them all
            out = multihost_utils.process_allgather(out, tiled=True)
        tokens, logps, lengths, stopped, steps = jax.device_get(out)
        self.last_decode_steps = int(steps)
        generate_s = time.perf_counter() - start
        rows = range(num_prompts * n)
        return RolloutBatch(
            prompt_ids=[list(map(int, p)) for p in prompts],
            token_ids=[tokens[r, :lengths[r]].tolist() for r in rows],
            logprobs=[logps[r, :lengths[r]].astype(np.float32) for r in rows],
            finish_reasons=[FINISH_STOP if stopped[r] else FINISH_LENGTH for r in rows],
            n=n, weight_version=self.weight_version,
            timing={"generate_s": generate_s, "prefill_s": prefill_s,
                    "decode_s": generate_s - prefill_s})
