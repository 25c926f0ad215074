"""The producer-thread schedule: rollouts from external engines (vLLM servers) generated and
scored while the trainer updates, at most k = rollout.max_staleness >= 1 steps ahead.

A producer thread makes the batches in step order (schedule.py: batch b by version
max(floor, b - k)): it waits until its version has been published, makes the engine serve it
(a sync only when the engine is on another version), and runs the batch's rounds, each
prompt's group scored as it returns. It only makes HTTP calls and host-side work (prompts,
decoding, the RewardPool's processes, reward shaping on the CPU device). Everything that
touches the trainer's devices or is a collective stays in the main thread at a fixed point:
`publish` copies the new version to host (a gather across processes, cast on device to the
sync dtype first), `next_batch` takes the finished batch (and, with several processes,
broadcasts it from process 0: only process 0 talks to the servers, scores the rewards once
and shares the scored groups), `state_dict` waits for the batches in flight.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from prorl_jax.pipeline.schedule import Pipeline
from prorl_jax.rollout.base import RolloutEngine
from prorl_jax.rollout.multihost import broadcast_object
from prorl_jax.rollout.vllm_http import VLLMServerError
from prorl_jax.rollout.vllm_sync import WeightSyncError


def host_copy(params: Any, dtype=None) -> Any:
    """`params` as numpy arrays on host, cast to `dtype` on device first (None: as they are);
    arrays sharded over several processes are gathered (a collective: every process calls)."""
    def one(x):
        if isinstance(x, jax.Array):
            x = x.astype(dtype) if dtype is not None and x.dtype != dtype else x
            if not x.is_fully_addressable:
                x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)
    return jax.tree.map(one, params)


class ThreadedPipeline(Pipeline):
    """See the module docstring. producer_engine: the engine the producer drives (process
    0's VLLMClient inside a ProcessZeroEngine; None on the other processes); host_dtype: the
    dtype of the host copies (the writer's, bfloat16 for vLLM; None: the params'); broadcast:
    share each batch from process 0 (several processes)."""

    def __init__(self, *args, producer_engine: Optional[RolloutEngine], host_dtype=None,
                 broadcast: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.producer_engine, self.host_dtype = producer_engine, host_dtype
        self.broadcast = broadcast
        self._cv = threading.Condition()
        self._engine_lock = threading.Lock()   # the producer's batch, or engine_at's user
        self._versions: dict[int, Any] = {}    # version -> host copy, until no batch needs it
        self._ready: dict[int, Any] = {}       # step -> ScoredBatch
        self._next = 0                         # the batch the producer makes next
        self._served: Optional[int] = None     # the version the engine serves
        self._last_published: Optional[int] = None
        self._error: Optional[BaseException] = None
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    @property
    def talks(self) -> bool:
        """Whether this process drives the engine (process 0)."""
        return self.producer_engine is not None

    # -- main thread -----------------------------------------------------------------------------

    def publish(self, params, version, *, changed=True):
        if not self.needs_version(version):
            return
        same = not changed and self._last_published == version - 1
        host = None if same else host_copy(params, self.host_dtype)  # a collective: all call
        self._last_published = version
        if self.talks:
            with self._cv:
                self._versions[version] = self._versions[version - 1] if same else host
                self._cv.notify_all()

    def next_batch(self, step):
        if self.talks and self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="rollout-producer",
                                            daemon=True)
            self._thread.start()
        batch = self._shared(lambda: self._take(step))
        return self._checked(step, batch)

    def _take(self, step: int):
        with self._cv:
            self._cv.wait_for(lambda: step in self._ready or self._error is not None)
            if step not in self._ready:
                raise self._error
            return self._ready.pop(step)

    def _shared(self, call: Callable[[], Any]) -> Any:
        """call() on the producing process; with `broadcast`, its result (or error: a
        VLLMServerError / WeightSyncError / RuntimeError with its message) on every process."""
        result, error = None, None
        if self.talks:
            try:
                result = call()
            except BaseException as e:
                if not self.broadcast:
                    raise
                error = (type(e).__name__, str(e), getattr(e, "servers", {}))
        if self.broadcast:
            result, error = broadcast_object((result, error))
        if error is not None:
            name, message, servers = error
            if name == "WeightSyncError":
                raise WeightSyncError(message, servers)
            raise (VLLMServerError if name == "VLLMServerError" else RuntimeError)(message)
        return result

    @contextlib.contextmanager
    def engine_at(self, params, version):
        lock = self._engine_lock if self.talks else contextlib.nullcontext()
        with lock:  # waits for the producer's batch in flight
            self.engine.update_weights(params, version)
            self._served = version
            yield self.engine

    def _saved_batches(self, step):
        end = min(step + self.k, self.total_steps)
        with self._cv:  # (process 0, inside state_dict) a failed producer: what it finished
            self._cv.wait_for(lambda: self._error is not None
                              or all(t in self._ready for t in range(step, end)))
            out = []
            for t in range(step, end):
                if t not in self._ready:
                    break
                out.append(self._ready[t])
            return out

    def state_dict(self, step):
        """Process 0's (data, meta, blobs), on every process (they save the same)."""
        return self._shared(lambda: Pipeline.state_dict(self, step))

    def _restore_batches(self, step, batches):
        with self._cv:
            self._ready = {b.step: b for b in batches}
            self._next = step + len(batches)
            self._versions, self._served, self._last_published = {}, None, None

    def close(self):
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        super().close()

    # -- the producer thread ---------------------------------------------------------------------

    def _produce(self) -> None:
        try:
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                while self._produce_one():
                    pass
        except BaseException as e:  # raised in the main thread by next_batch / state_dict
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def _produce_one(self) -> bool:
        """Makes the next batch; False when there is none to make (or the run stops)."""
        with self._cv:
            step = self._next
            if self._stop or step >= self.total_steps:
                return False
            version = self.version_of(step)
            waited = time.perf_counter()
            self._cv.wait_for(lambda: self._stop or version in self._versions)
            if self._stop:
                return False
            waited = time.perf_counter() - waited
            weights = self._versions[version]
        with self._engine_lock:
            if self._served != version:
                self.producer_engine.update_weights(weights, version)
                self._served = version
            builder = self._builder(step)
            batch = builder.run(self.producer_engine)
        batch.stats["time/producer_wait"] = round(waited, 4)
        with self._cv:
            self._ready[step] = batch
            self._next = step + 1
            for old in [v for v in self._versions if v < version]:
                del self._versions[old]
            self._cv.notify_all()
        return True
