"""External rollout engines in a multi-process run: process 0 talks to the servers, every
process gets the same `RolloutBatch`.

Without this, each of N trainer processes would send the same generation requests (N x the
load, and N weight syncs). The embedded JaxSampler needs no wrapper: it runs SPMD on the
global mesh like the update does.
"""
from __future__ import annotations

import pickle
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from prorl_jax.rollout.base import RolloutBatch, RolloutEngine
from prorl_jax.rollout.vllm_http import VLLMServerError
from prorl_jax.rollout.vllm_sync import WeightSyncError


def broadcast_object(obj: Any) -> Any:
    """Process 0's picklable `obj`, on every process (others pass anything, e.g. None)."""
    payload = pickle.dumps(obj) if jax.process_index() == 0 else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload))))
    buf = np.frombuffer(payload, np.uint8) if jax.process_index() == 0 else np.zeros(size,
                                                                                    np.uint8)
    return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes())


class ProcessZeroEngine(RolloutEngine):
    """Runs `make_engine()` on process 0 only and broadcasts its results.

    make_engine: builds the real engine (e.g. a VLLMClient); called on process 0 only.
    take_part_in_write: called with the params on the other processes during a weight update,
        so collective gathers inside the engine's writer (`save_pretrained` on sharded params)
        see every process; None when the writer needs no collectives.
    """

    def __init__(self, make_engine: Callable[[], RolloutEngine],
                 take_part_in_write: Optional[Callable[[Any], None]] = None):
        self.is_zero = jax.process_index() == 0
        self.engine = make_engine() if self.is_zero else None
        self.take_part_in_write = take_part_in_write

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, temperature: float,
                 top_p: float, max_new_tokens: int, stop_token_ids: Sequence[int],
                 seed: int) -> RolloutBatch:
        return self._on_zero(lambda: self.engine.generate(
            prompts, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids, seed=seed))

    def update_weights(self, params_or_model: Any, version: int) -> None:
        if not self.is_zero and self.take_part_in_write is not None:
            self.take_part_in_write(params_or_model)
        self._on_zero(lambda: self.engine.update_weights(params_or_model, version))
        multihost_utils.sync_global_devices(f"prorl_jax weights v{version}")

    def _on_zero(self, call: Callable[[], Any]) -> Any:
        """call() on process 0, its result broadcast; a server error there is raised on every
        process (as a VLLMServerError / WeightSyncError with process 0's message), so no
        process waits for a broadcast that never comes."""
        result, error = None, None
        if self.is_zero:
            try:
                result = call()
            except VLLMServerError as e:
                error = (type(e).__name__, str(e), getattr(e, "servers", {}))
        result, error = broadcast_object((result, error))
        if error is not None:
            name, message, servers = error
            if name == "WeightSyncError":
                raise WeightSyncError(message, servers)
            raise VLLMServerError(message)
        return result

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
