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
        batch = None
        if self.is_zero:
            batch = self.engine.generate(prompts, n=n, temperature=temperature, top_p=top_p,
                                         max_new_tokens=max_new_tokens,
                                         stop_token_ids=stop_token_ids, seed=seed)
        return broadcast_object(batch)

    def update_weights(self, params_or_model: Any, version: int) -> None:
        if self.is_zero:
            self.engine.update_weights(params_or_model, version)
        elif self.take_part_in_write is not None:
            self.take_part_in_write(params_or_model)
        multihost_utils.sync_global_devices(f"prorl_jax weights v{version}")

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
