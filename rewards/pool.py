"""Parallel scoring in worker processes that a slow, hanging or crashing checker cannot stall.

`RewardPool` keeps `num_workers` processes (start method "forkserver" by default: never a fork
of the caller, so it is safe from a process with JAX initialised) and reuses them across calls.
Items go out in small chunks; a worker answers item by item, so the parent knows which item each
worker is on and since when. An item past its time limit gets reward 0 with status "timeout" and
its worker is killed and replaced (the rest of its chunk is re-queued); a worker that dies gets
status "crash" for its current item. A checker that raises gives 0 with status "crash".
"""
from __future__ import annotations

import collections
import dataclasses
import math
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import time

from rewards.extract import answer_region
from rewards.registry import scoring_domain
from rewards.sandbox import SandboxUnavailableError

STATUSES = ("ok", "unanswered", "crash", "timeout")
CHUNKS_PER_WORKER = 4  # load balancing: aim for this many chunks per worker per batch
MAX_CHUNK = 32
DEFAULT_WORKER_MEMORY_BYTES = 8 << 30  # address space per worker (8 GiB)


@dataclasses.dataclass
class BatchDetails:
    """Per-item outcome of a `score_batch` call: status[i] in STATUSES."""

    status: list[str]
    seconds: float = 0.0  # wall time of the call

    def count(self, status: str) -> int:
        return sum(1 for s in self.status if s == status)

    @property
    def num_crashed(self) -> int:
        return self.count("crash")

    @property
    def num_timed_out(self) -> int:
        return self.count("timeout")

    @property
    def num_unanswered(self) -> int:
        return self.count("unanswered")

    def as_dict(self) -> dict:
        return {"num_items": len(self.status), "num_crashed": self.num_crashed,
                "num_timed_out": self.num_timed_out, "num_unanswered": self.num_unanswered,
                "seconds": self.seconds}


def guarded_score(fn, record: dict, answer: str) -> tuple[float, str]:
    """(reward, status) of one verifier call: exceptions and bad values -> (0.0, "crash").

    SandboxUnavailableError is not swallowed: scoring code without a sandbox must refuse.
    """
    try:
        value = float(fn(record, answer))
    except SandboxUnavailableError:
        raise
    except Exception:
        return 0.0, "crash"
    if not math.isfinite(value):
        return 0.0, "crash"
    return min(max(value, 0.0), 1.0), "ok"


def _worker_main(conn, memory_bytes: int | None) -> None:
    """Worker loop: receive chunks [(index, fn, record, answer)], send (index, reward, status).

    memory_bytes: RLIMIT_AS of the worker, so a checker that blows up (e.g. sympy on a huge
    expression) raises MemoryError (status "crash") instead of exhausting the machine.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    import rewards  # noqa: F401  (registers the built-in domains)

    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for index, fn, record, answer in chunk:
            try:
                value, status = guarded_score(fn, record, answer)
            except SandboxUnavailableError as err:
                value, status = 0.0, "fatal:" + str(err)
            conn.send((index, value, status))


@dataclasses.dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    items: collections.deque = dataclasses.field(default_factory=collections.deque)
    item_start: float = 0.0


def prepare_batch(records: list, responses: list, think_mode: str):
    """Validate a batch in the caller: ([n] domains, [n] answer regions or None).

    Raises RecordError naming the record index and field, TypeError for a non-string response.
    """
    if len(records) != len(responses):
        raise ValueError(f"score_batch: {len(records)} records but {len(responses)} responses")
    domains = [scoring_domain(r, i) for i, r in enumerate(records)]
    answers = []
    for i, resp in enumerate(responses):
        if not isinstance(resp, str):
            raise TypeError(f"responses[{i}]: expected str, got {type(resp).__name__}")
        answers.append(answer_region(resp, think_mode))
    return domains, answers


class RewardPool:
    """A reusable pool of scoring processes. Use as a context manager or call `close()`."""

    def __init__(self, num_workers: int | None = None, *, start_method: str = "forkserver",
                 worker_memory_bytes: int | None = DEFAULT_WORKER_MEMORY_BYTES):
        """num_workers: default CPU count (at most 16); start_method: "forkserver" or "spawn"
        (not "fork": unsafe once JAX runs); worker_memory_bytes: address-space cap per worker."""
        self.num_workers = int(num_workers or max(1, min(os.cpu_count() or 1, 16)))
        self.worker_memory_bytes = worker_memory_bytes
        if self.num_workers < 1:
            raise ValueError(f"num_workers: expected >= 1, got {num_workers}")
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # nltk (IFEval's tokenizers) takes ~1.5 s to import: once here, not per worker
            self._ctx.set_forkserver_preload(["rewards", "math_verify",
                                              "nltk.tokenize.destructive"])
        self._workers: list[_Worker] = []
        self._closed = False

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_main,
                                    args=(child_conn, self.worker_memory_bytes), daemon=True,
                                    name="reward-worker")
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn)

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._spawn()

    def score_batch(self, records: list, responses: list, *, think_mode: str = "require",
                    timeout_s: float | None = None, return_details: bool = False):
        """Rewards [n] in [0, 1] (and BatchDetails if `return_details`); see module docstring.

        timeout_s: per-item limit in seconds (default registry.DEFAULT_TIMEOUT_S); a domain with
          its own budget (code) gets at least that (registry.Domain.time_limit_s).
        """
        if self._closed:
            raise RuntimeError("RewardPool.score_batch: the pool is closed")
        start = time.monotonic()
        domains, answers = prepare_batch(records, responses, think_mode)
        n = len(records)
        rewards, status = [0.0] * n, ["unanswered"] * n
        limits = [d.time_limit_s(r, timeout_s) for d, r in zip(domains, records)]
        items = [(i, domains[i].fn, records[i], answers[i]) for i in range(n)
                 if answers[i] is not None]
        if items:
            try:
                self._run(items, limits, rewards, status)
            except BaseException:
                self._abort_busy()  # never leave a worker with a stale chunk
                raise
        details = BatchDetails(status, time.monotonic() - start)
        return (rewards, details) if return_details else rewards

    def _run(self, items: list, limits: list, rewards: list, status: list) -> None:
        """Score `items` [(index, fn, record, answer)] into rewards/status (indexed by item)."""
        for w in [w for w in self._workers if not w.process.is_alive()]:
            self._replace(w)  # died between calls (e.g. killed from outside)
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())
        size = max(1, min(MAX_CHUNK, math.ceil(len(items) / (self.num_workers * CHUNKS_PER_WORKER))))
        queue = collections.deque(items[k:k + size] for k in range(0, len(items), size))
        pending = len(items)
        while pending:
            self._dispatch(queue)
            busy = [w for w in self._workers if w.items]
            if not busy:
                if queue:
                    continue  # a worker was replaced before taking a chunk: assign again
                raise RuntimeError(f"RewardPool: {pending} items pending but none queued or busy")
            now = time.monotonic()
            wait_s = min(w.item_start + limits[w.items[0][0]] for w in busy) - now
            ready = multiprocessing.connection.wait([w.conn for w in busy], max(wait_s, 0))
            now = time.monotonic()
            for w in busy:
                outcome = self._poll(w, w.conn in ready, now, limits, queue)
                if outcome is None:
                    continue
                index, value, st = outcome
                if st.startswith("fatal:"):
                    raise SandboxUnavailableError(st[len("fatal:"):])
                rewards[index], status[index] = value, st
                pending -= 1

    def _dispatch(self, queue: collections.deque) -> None:
        """Send the next chunk to every idle worker (replacing any that died idle)."""
        now = time.monotonic()
        for w in list(self._workers):
            if w.items or not queue:
                continue
            chunk = queue.popleft()
            try:
                w.conn.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                queue.appendleft(chunk)
                self._replace(w)
                continue
            w.items, w.item_start = collections.deque(chunk), now

    def _poll(self, w: _Worker, is_ready: bool, now: float, limits: list,
              queue: collections.deque) -> tuple[int, float, str] | None:
        """(index, reward, status) of worker w's current item if it has an outcome yet.

        A result; or "crash" if the worker died on it; or "timeout" if it ran past its limit
        (the worker is killed). Either way the rest of the worker's chunk goes back on the queue.
        """
        index = w.items[0][0]
        if is_ready:
            try:
                result = w.conn.recv()
            except (EOFError, OSError):
                self._requeue(w, queue, skip_first=True)
                self._replace(w)
                return index, 0.0, "crash"
            w.items.popleft()
            w.item_start = now
            return result
        if now - w.item_start >= limits[index]:
            self._requeue(w, queue, skip_first=True)
            self._replace(w)
            return index, 0.0, "timeout"
        return None

    @staticmethod
    def _requeue(worker: _Worker, queue: collections.deque, skip_first: bool) -> None:
        rest = list(worker.items)[1 if skip_first else 0:]
        if rest:
            queue.appendleft(rest)
        worker.items = collections.deque()

    def _abort_busy(self) -> None:
        for w in list(self._workers):
            if w.items:
                w.items = collections.deque()
                self._replace(w)

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (started on first use)."""
        return [w.process.pid for w in self._workers]

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self._workers:
            w.process.join(timeout=2)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=2)
            w.conn.close()
        self._workers = []
        self._closed = True

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()
