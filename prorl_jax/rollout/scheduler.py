"""The continuous-batching slot scheduler of the embedded sampler (host side, numpy only).

One `generate` call has R = P * n rows (prompt-major: sample j of prompt i is row i*n + j). A
fixed number S of decode slots, split evenly over the H batch shards, decodes them: whenever
rows finish, their slots are refilled from the waiting rows (in row order); a prompt is prefilled
into a shard the first time one of its samples is admitted there, and its blocks are shared by
all of its samples on that shard until the last of them finishes. When no row waits and every
shard's live rows fit a smaller slot bucket (S/2, S/4, ... >= min_slots), the live rows are
compacted into it (only host-side slot indices move: a row's blocks stay where they are).

A row's virtual sequence (see `paged_kv`): prompt[:-1] left-padded to a whole number of blocks
(A = ceil((len - 1) / block_size) * block_size slots, the first A - (len - 1) never attended),
then prompt[-1] at slot A, then the generated tokens. The first decode step of a row feeds
prompt[-1] (position len - 1) and samples token 0; step t feeds token t - 1 and samples token t.

Memory: every admitted row reserves its worst case (its prompt's blocks unless already resident,
plus ceil(max_new / block_size) of its own); blocks are taken from the reservation as the row
grows, so the pool never runs out and no row is ever preempted. The pool is sized for S such
rows (`pool_blocks_per_shard`), whatever R is.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from prorl_jax.fields import Section, at_least, field, int_at_least
from prorl_jax.rollout.paged_kv import TRASH_BLOCK

BATCHING_MODES = ("continuous", "static")


@dataclasses.dataclass(frozen=True)
class BatchingConfig(Section):
    """How the embedded sampler batches a call's rows (config.rollout; configs/prorl.py).

    mode:         "continuous" (decode slots refilled as rows finish, paged KV) or "static"
                  (every row in one batch until the longest is done, dense KV of the maximum).
    decode_slots: decode slots (a multiple of the batch shards); 0: as many as kv_cache_gb
                  allows, or, with no budget either, every row of the call.
    kv_cache_gb:  KV pool budget per batch shard (device), in GiB; 0: none.
    block_size:   tokens per KV block.
    chunk_steps:  most decode steps per device call (the loop returns earlier to refill or
                  compact slots).
    min_slots:    the smallest slot bucket compaction goes down to (each bucket is compiled
                  once; on accelerators a step costs about the same below a few dozen rows).
    """
    mode: str = field("rollout.batching", "continuous", choices=BATCHING_MODES)
    decode_slots: int = field("rollout.decode_slots", 0, *int_at_least(0))
    kv_cache_gb: float = field("rollout.kv_cache_gb", 0.0, *at_least(0))
    block_size: int = field("rollout.kv_block_size", 16, *int_at_least(1))
    chunk_steps: int = field("rollout.decode_chunk_steps", 32, *int_at_least(1))
    min_slots: int = field("rollout.min_decode_slots", 1, *int_at_least(1))

    @property
    def kv_cache_bytes(self) -> float:
        return self.kv_cache_gb * 2**30


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def power_buckets(limit: int, floor: int = 1) -> list[int]:
    """floor, 2*floor, 4*floor, ... below limit, then limit itself (ascending)."""
    out, b = [], floor
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


@dataclasses.dataclass
class Prefill:
    """A prompt to write into a shard's pool: its tokens but the last, its blocks."""
    shard: int
    prompt: int
    blocks: list[int]


@dataclasses.dataclass
class ChunkPlan:
    """Device inputs of one decode chunk over S slots (empty slots: inactive, trash blocks)."""
    block_table: np.ndarray  # int32[S, F]: blocks through the chunk's last slot; the first C
    read_blocks: int         # C: blocks holding the rows' context before the chunk
    kv_start: np.ndarray     # int32[S]
    ctx_len: np.ndarray      # int32[S]: virtual slot of each slot's next input token
    input_tok: np.ndarray    # int32[S]
    position: np.ndarray     # int32[S]
    row_id: np.ndarray       # int32[S]
    steps_done: np.ndarray   # int32[S]: tokens the row has generated
    active: np.ndarray       # bool[S]
    exit_free: int           # return once this many slots are free ...
    compact_live: int        # ... or every shard has at most this many live rows (-1: never)


class SlotScheduler:
    """The host-side state of one continuous-batching `generate` call; see the module doc.

    prompts: the P prompts (token-id lists); n: samples per prompt; max_new: the call's
    max_new_tokens; slots: S; shards: H; block_size; blocks_per_shard: the pool's blocks per
    shard (local block 0 is the trash block); min_slots, chunk_steps: see BatchingConfig;
    max_row_blocks: the widest block table a row can need (the context buckets' top).
    """

    def __init__(self, prompts: Sequence[Sequence[int]], n: int, max_new: int, *, slots: int,
                 shards: int, block_size: int, blocks_per_shard: int, min_slots: int,
                 chunk_steps: int, max_row_blocks: int):
        if slots % shards:
            raise ValueError(f"decode slots {slots} must be a multiple of the {shards} shards")
        self.prompts, self.n, self.max_new = [list(p) for p in prompts], n, max_new
        self.shards, self.bs, self.chunk_steps = shards, block_size, chunk_steps
        self.aligned = [blocks_for(len(p) - 1, block_size) * block_size for p in self.prompts]
        self.own_worst = blocks_for(max_new, block_size)
        self.capacity = blocks_per_shard - 1
        self.free_blocks = [list(range(blocks_per_shard - 1, TRASH_BLOCK, -1))
                            for _ in range(shards)]
        self.reserved = [0] * shards
        self.resident: list[dict[int, list]] = [{} for _ in range(shards)]  # p -> [blocks, live]
        self.buckets = [b for b in power_buckets(slots, shards)
                        if b >= min(slots, max(min_slots, shards)) and b % shards == 0]
        self.ctx_buckets = power_buckets(max_row_blocks)
        self.waiting = collections.deque(range(len(self.prompts) * n))
        num_rows = len(self.prompts) * n
        self.tokens: list[list[int]] = [[] for _ in range(num_rows)]
        self.logps: list[list[float]] = [[] for _ in range(num_rows)]
        self.stopped = np.zeros(num_rows, bool)
        self.finished = 0
        self._resize(slots)

    # -- per-slot state ----------------------------------------------------------------------

    def _resize(self, slots: int) -> None:
        self.num_slots = slots
        self.slot_row = np.full(slots, -1, np.int64)
        self.ctx_len = np.zeros(slots, np.int32)
        self.steps_done = np.zeros(slots, np.int32)
        self.own_blocks: list[list[int]] = [[] for _ in range(slots)]

    @property
    def per_shard(self) -> int:
        return self.num_slots // self.shards

    def shard_of(self, slot: int) -> int:
        return slot // self.per_shard

    def live_per_shard(self) -> np.ndarray:
        return (self.slot_row >= 0).reshape(self.shards, -1).sum(axis=1)

    @property
    def done(self) -> bool:
        return self.finished == len(self.tokens)

    # -- admission ---------------------------------------------------------------------------

    def _pick_shard(self, prompt: int, free: list[list[int]]) -> Optional[int]:
        """The shard where `prompt` is resident and a slot is free, else the shard with the most
        free slots that can reserve the prompt's blocks and a row's; None if none can."""
        for h in range(self.shards):
            if free[h] and prompt in self.resident[h] and (
                    self.reserved[h] + self.own_worst <= self.capacity):
                return h
        need = self.own_worst + self.aligned[prompt] // self.bs
        fits = [h for h in range(self.shards)
                if free[h] and self.reserved[h] + need <= self.capacity]
        return max(fits, key=lambda h: (len(free[h]), -h)) if fits else None

    def admit(self) -> list[Prefill]:
        """Fills free slots from the waiting rows; returns the prompts to prefill first."""
        free = [[s for s in range(h * self.per_shard, (h + 1) * self.per_shard)
                 if self.slot_row[s] < 0][::-1] for h in range(self.shards)]
        prefills = []
        while self.waiting:
            row = self.waiting[0]
            prompt = row // self.n
            h = self._pick_shard(prompt, free)
            if h is None:
                break
            self.waiting.popleft()
            if prompt not in self.resident[h]:
                nblocks = self.aligned[prompt] // self.bs
                blocks = [self.free_blocks[h].pop() for _ in range(nblocks)]
                self.resident[h][prompt] = [blocks, 0]
                self.reserved[h] += nblocks
                if nblocks:
                    prefills.append(Prefill(h, prompt, blocks))
            self.resident[h][prompt][1] += 1
            self.reserved[h] += self.own_worst
            slot = free[h].pop()
            self.slot_row[slot] = row
            self.ctx_len[slot] = self.aligned[prompt]
            self.steps_done[slot] = 0
            self.own_blocks[slot] = []
        return prefills

    def _release(self, slot: int) -> None:
        h, row = self.shard_of(slot), int(self.slot_row[slot])
        prompt = row // self.n
        self.free_blocks[h].extend(self.own_blocks[slot])
        self.own_blocks[slot] = []
        self.reserved[h] -= self.own_worst
        entry = self.resident[h][prompt]
        entry[1] -= 1
        if entry[1] == 0:
            self.free_blocks[h].extend(entry[0])
            self.reserved[h] -= len(entry[0])
            del self.resident[h][prompt]
        self.slot_row[slot] = -1
        self.finished += 1

    # -- compaction --------------------------------------------------------------------------

    def compact(self) -> bool:
        """Moves to the smallest slot bucket every shard's live rows fit, if no row waits and
        some row may still run two chunks (compaction costs a return to the host, and a compile
        the first time a bucket is used)."""
        live_slots = self.slot_row >= 0
        if self.waiting or not live_slots.any() or (
                self.max_new - int(self.steps_done[live_slots].min()) < 2 * self.chunk_steps):
            return False
        live = int(self.live_per_shard().max())
        target = min((b for b in self.buckets if b // self.shards >= live),
                     default=self.num_slots)
        if target >= self.num_slots:
            return False
        old = (self.slot_row, self.ctx_len, self.steps_done, self.own_blocks, self.per_shard)
        self._resize(target)
        for h in range(self.shards):
            rows = [s for s in range(h * old[4], (h + 1) * old[4]) if old[0][s] >= 0]
            for i, s in enumerate(rows):
                new = h * self.per_shard + i
                self.slot_row[new], self.ctx_len[new] = old[0][s], old[1][s]
                self.steps_done[new], self.own_blocks[new] = old[2][s], old[3][s]
        return True

    # -- one decode chunk --------------------------------------------------------------------

    def plan_chunk(self, refill_min_free: int) -> ChunkPlan:
        """Allocates the blocks the live rows may fill in chunk_steps steps and builds the
        device inputs; the chunk returns early once `refill_min_free` more slots are free
        (rows waiting) or the slots can be compacted (none waiting)."""
        s_count, active = self.num_slots, self.slot_row >= 0
        need = 1  # blocks of the longest context before the chunk
        for s in np.flatnonzero(active):
            row = int(self.slot_row[s])
            steps = min(self.chunk_steps, self.max_new - int(self.steps_done[s]))
            last = int(self.ctx_len[s]) + steps - 1  # the last virtual slot written
            prompt_blocks = self.aligned[row // self.n] // self.bs
            h = self.shard_of(s)
            while prompt_blocks + len(self.own_blocks[s]) <= last // self.bs:
                self.own_blocks[s].append(self.free_blocks[h].pop())
            need = max(need, blocks_for(int(self.ctx_len[s]), self.bs))
        read = min(b for b in self.ctx_buckets if b >= need)
        table = np.full((s_count, read + blocks_for(self.chunk_steps, self.bs)), TRASH_BLOCK,
                        np.int32)
        kv_start = np.zeros(s_count, np.int32)
        input_tok = np.zeros(s_count, np.int32)
        position = np.zeros(s_count, np.int32)
        row_id = np.zeros(s_count, np.int32)
        for s in np.flatnonzero(active):
            row = int(self.slot_row[s])
            prompt = row // self.n
            blocks = self.resident[self.shard_of(s)][prompt][0] + self.own_blocks[s]
            table[s, :len(blocks)] = blocks[:table.shape[1]]
            plen, done = len(self.prompts[prompt]), int(self.steps_done[s])
            kv_start[s] = self.aligned[prompt] - (plen - 1)
            input_tok[s] = self.tokens[row][-1] if done else self.prompts[prompt][-1]
            position[s] = plen - 1 + done
            row_id[s] = row
        free_now = s_count - int(active.sum())
        remaining = self.max_new - int(self.steps_done[active].min())
        worth_compacting = remaining >= 2 * self.chunk_steps
        if self.waiting:
            exit_free, compact_live = free_now + max(1, min(refill_min_free,
                                                            len(self.waiting))), -1
        else:
            smaller = [b for b in self.buckets if b < self.num_slots]
            exit_free = s_count + 1
            compact_live = max(smaller) // self.shards if smaller and worth_compacting else -1
        return ChunkPlan(table, read, kv_start, self.ctx_len.copy(), input_tok, position, row_id,
                         self.steps_done.copy(), active, exit_free, compact_live)

    def record_chunk(self, tokens: np.ndarray, logps: np.ndarray, steps_done: np.ndarray,
                     still_active: np.ndarray, stopped: np.ndarray) -> None:
        """Appends each live slot's new tokens [S, K] / log-probs and frees finished rows."""
        for s in np.flatnonzero(self.slot_row >= 0):
            row = int(self.slot_row[s])
            new = int(steps_done[s]) - int(self.steps_done[s])
            self.tokens[row].extend(tokens[s, :new].tolist())
            self.logps[row].extend(logps[s, :new].tolist())
            self.ctx_len[s] += new
            self.steps_done[s] = steps_done[s]
            if not still_active[s]:
                self.stopped[row] = bool(stopped[s])
                self._release(s)

    # -- sizes -------------------------------------------------------------------------------

    @staticmethod
    def pool_blocks_per_shard(slots_per_shard: int, max_prompt_len: int, max_new: int,
                              block_size: int) -> int:
        """Blocks per shard for that many worst-case rows (own prompt copy each) + trash."""
        row = (blocks_for(max_prompt_len - 1, block_size) + blocks_for(max_new, block_size))
        return slots_per_shard * row + 1


def row_bytes(num_layers: int, kv_heads: int, head_dim: int, itemsize: int,
              max_prompt_len: int, max_new: int, block_size: int) -> int:
    """KV bytes a worst-case row reserves (its prompt's blocks and its own)."""
    blocks = blocks_for(max_prompt_len - 1, block_size) + blocks_for(max_new, block_size)
    return blocks * block_size * num_layers * 2 * kv_heads * head_dim * itemsize


def decode_slots(config: BatchingConfig, rows: int, shards: int, row_kv_bytes: int) -> int:
    """The call's slot count S: decode_slots, or what kv_cache_bytes allows, or one per row;
    never more than `rows` (the call's rows rounded up to its batch bucket, a multiple of the
    shards)."""
    wanted = int(config.decode_slots)
    if not wanted and config.kv_cache_bytes:
        per_shard = int(config.kv_cache_bytes // row_kv_bytes)
        if per_shard < 1:
            raise ValueError(f"rollout.kv_cache_gb: {config.kv_cache_bytes / 2**30:.3g} GiB per "
                             f"device holds no worst-case row ({row_kv_bytes / 2**30:.3g} GiB)")
        wanted = per_shard * shards
    slots = min(wanted, rows) if wanted else rows
    if slots % shards:
        raise ValueError(f"rollout.decode_slots={slots} must be a multiple of the {shards} "
                         "batch shards")
    return slots
