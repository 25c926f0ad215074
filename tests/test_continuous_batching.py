"""Continuous batching in the embedded sampler: few slots refilled as rows finish, compaction,
the paged KV cache, prompts shared by their samples, sharding, bounded memory, and the
scheduler's bookkeeping on its own (numpy only).

The reference is the static path (every row in one batch, dense cache; itself checked against
the plain full forward in test_jax_sampler.py): with the same seed every row must get the same
tokens whatever slots it ran in, and log-probs equal to float rounding.
"""
import numpy as np
import pytest
from jax.sharding import Mesh

import jax
from prorl_jax.models import PRESETS, init_model
from prorl_jax.rollout import JaxSampler
from prorl_jax.rollout.scheduler import (BatchingConfig, SlotScheduler, decode_slots,
                                         row_bytes)
from test_jax_sampler import PROMPTS, peaky_model

N, MAX_NEW = 2, 12
FEW = BatchingConfig(decode_slots=4, block_size=8, chunk_steps=4, min_slots=1)


def make(model, batching, mesh=None, max_new=MAX_NEW):
    return JaxSampler(model, max_prompt_len=16, max_new_tokens=max_new, prompt_buckets=(16,),
                      batch_buckets=(4,), mesh=mesh, batching=batching)


@pytest.fixture(scope="module")
def model():
    return peaky_model(0)


@pytest.fixture(scope="module")
def static(model):
    return make(model, BatchingConfig(mode="static"))


@pytest.fixture(scope="module")
def few(model):
    return make(model, FEW)


def run(sampler, **kw):
    args = dict(n=N, temperature=1.2, top_p=1.0, max_new_tokens=MAX_NEW, stop_token_ids=(),
                seed=5)
    args.update(kw)
    return sampler.generate(PROMPTS, **args)


def assert_same_rollouts(got, want):
    assert got.token_ids == want.token_ids
    assert got.finish_reasons == want.finish_reasons
    for row, (x, y) in enumerate(zip(got.logprobs, want.logprobs)):
        np.testing.assert_allclose(x, y, atol=2e-5, err_msg=f"row {row}")


@pytest.fixture(scope="module")
def stop_ids(static):
    """Two stop ids that end some rows early and leave others to run to the cap (so slots
    free at different times and the drain compacts)."""
    free_run = run(static)
    early = [t[3] for t in free_run.token_ids[::2]]  # the 4th token of each prompt's sample 0
    stops = sorted(set(early))[:2]
    return stops


def test_four_slots_equal_the_static_batch(few, static, stop_ids):
    want = run(static, stop_token_ids=stop_ids)
    got = run(few, stop_token_ids=stop_ids)
    assert {"stop", "length"} <= set(want.finish_reasons), want.finish_reasons
    assert_same_rollouts(got, want)
    stats = few.last_stats
    assert stats["slots"] == 4 and stats["chunks"] > 2
    assert stats["compactions"] >= 1, "the drain went down to smaller slot buckets"
    # prompt [42] has nothing to prefill; the other three once each, shared by both samples
    assert stats["prompts_prefilled"] == 3
    # accounting: one live row-step per generated token; the queries' KV by hand
    assert stats["live_row_steps"] == stats["generated_tokens"] == sum(map(len, got.token_ids))
    assert stats["kv_slots_attended"] == stats["kv_slots_min"]
    assert 0 < stats["slot_utilisation"] <= 1
    assert stats["slot_steps"] < static.last_stats["slot_steps"]


def test_greedy_waves_equal_the_static_batch(few, static):
    """8 rows that all run to the cap through 4 slots: two waves of admissions."""
    want = run(static, temperature=0.0)
    got = run(few, temperature=0.0)
    assert_same_rollouts(got, want)
    assert set(got.finish_reasons) == {"length"}
    assert few.last_stats["decode_steps"] >= 2 * MAX_NEW


def test_sharded_pools_equal_one_device(model, few, stop_ids):
    """2 shards x 2 slots, each shard its own pool and prompt copies, rows refilled per shard."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = make(model, BatchingConfig(decode_slots=4, block_size=8, chunk_steps=4,
                                         min_slots=4), mesh=mesh)
    got = run(sharded, stop_token_ids=stop_ids)
    assert_same_rollouts(got, run(few, stop_token_ids=stop_ids))
    assert sharded.last_stats["slots"] == 4


def test_many_rows_in_bounded_memory(model):
    """64 prompts x 16 samples through 16 slots: the pool is sized by the slots, not the rows,
    and a row's samples are those of a smaller call with the same seed (its stream is its)."""
    sampler = JaxSampler(model, max_prompt_len=8, max_new_tokens=4, prompt_buckets=(8,),
                         batching=BatchingConfig(decode_slots=16, block_size=4))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, rng.integers(1, 9)).tolist() for _ in range(64)]
    kw = dict(n=16, temperature=1.0, top_p=1.0, max_new_tokens=4, stop_token_ids=[3, 7],
              seed=2)
    big = sampler.generate(prompts, **kw)
    big_stats = sampler.last_stats
    small = sampler.generate(prompts[:4], **kw)
    assert len(big.token_ids) == 1024 and big.token_ids[:64] == small.token_ids
    assert big_stats["slots"] == sampler.last_stats["slots"] == 16
    assert big_stats["kv_pool_bytes"] == sampler.last_stats["kv_pool_bytes"]
    per_row = row_bytes(2, 2, 16, 4, 8, 4, 4)  # tiny: 2 layers, 2 kv heads x 16, float32
    assert big_stats["kv_pool_bytes"] == 16 * per_row + 4 * sampler.kv_bytes_per_slot
    assert all(1 <= len(t) <= 4 for t in big.token_ids)
    assert {"stop", "length"} <= set(big.finish_reasons)


def test_qwen3_through_the_sampler_is_greedy_full_forward():
    """The protocol end to end for the second family: greedy continuous decoding equals the
    step-by-step argmax of the plain forward."""
    cfg = PRESETS["tiny-qwen3"].replace(tie_word_embeddings=False)
    model = init_model(cfg, 3)
    model.norm.weight[...] = model.norm.weight[...] * 10.0
    sampler = JaxSampler(model, max_prompt_len=16, max_new_tokens=6, prompt_buckets=(16,),
                         batching=BatchingConfig(decode_slots=2, block_size=4))
    prompts = [[5, 17, 99], [3, 1, 4, 1, 5, 9, 2]]
    got = sampler.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=6)
    forward = jax.jit(lambda m, ids: m(ids))
    for prompt, tokens in zip(prompts, got.token_ids):
        ids = list(prompt)
        padded = np.zeros((1, 16), np.int32)
        for _ in range(6):
            padded[0, :len(ids)] = ids
            ids.append(int(np.argmax(np.asarray(forward(model, padded))[0, len(ids) - 1])))
        assert tokens == ids[len(prompt):]


# ----------------------------------------------------------------------------- the scheduler
def simulate(sched: SlotScheduler, lengths: np.ndarray) -> int:
    """Drives the scheduler with a fake device where row r generates lengths[r] tokens (token
    value = row id); checks the pool invariants every chunk; returns the chunks run."""
    chunks = 0
    while not sched.done:
        prefills = sched.admit()
        for p in prefills:
            assert len(p.blocks) == sched.aligned[p.prompt] // sched.bs
        plan = sched.plan_chunk(refill_min_free=1)
        assert plan.active.any()
        for h in range(sched.shards):
            assert 0 <= sched.reserved[h] <= sched.capacity
            assert TRASH_FREE not in sched.free_blocks[h]
        steps = sched.chunk_steps
        done = plan.steps_done.copy()
        still = plan.active.copy()
        for s in np.flatnonzero(plan.active):
            row = plan.row_id[s]
            done[s] = min(lengths[row], done[s] + steps)
            still[s] = done[s] < lengths[row]
        tokens = np.repeat(plan.row_id[:, None], steps, axis=1)
        sched.record_chunk(tokens, np.zeros_like(tokens, np.float32), done, still,
                           np.zeros_like(still))
        sched.compact()
        chunks += 1
    return chunks


TRASH_FREE = 0


def test_scheduler_shares_prompts_and_returns_every_block():
    prompts = [[1] * 5, [2], [3] * 9, [4] * 2]  # aligned prompt[:-1]: 4, 0, 8, 4 slots
    sched = SlotScheduler(prompts, n=3, max_new=10, slots=4, shards=2, block_size=4,
                          blocks_per_shard=SlotScheduler.pool_blocks_per_shard(2, 9, 10, 4),
                          min_slots=1, chunk_steps=3, max_row_blocks=2 + 3)
    first = sched.admit()
    # rows 0..3 (prompt 0 x3, prompt 1 x1): prompt 0 on shard 0 (both slots) then shard 1
    assert [int(r) for r in sched.slot_row] == [0, 1, 2, 3]
    assert [(p.shard, p.prompt) for p in first] == [(0, 0), (1, 0)]
    assert sched.resident[0][0][1] == 2, "two samples share shard 0's copy of prompt 0"
    lengths = np.array([3, 7, 1, 10, 2, 5, 4, 4, 9, 1, 6, 2])
    total = sum(sched.capacity for _ in range(2))
    simulate(sched, lengths)
    assert [len(t) for t in sched.tokens] == [min(x, 10) for x in lengths]
    assert all(set(t) == {r} for r, t in enumerate(sched.tokens))
    assert sum(len(f) for f in sched.free_blocks) == total and sched.reserved == [0, 0]
    assert sched.resident == [{}, {}]


def test_scheduler_compacts_within_shards():
    sched = SlotScheduler([[1, 2, 3]] * 4, n=2, max_new=40, slots=8, shards=2, block_size=4,
                          blocks_per_shard=SlotScheduler.pool_blocks_per_shard(4, 3, 40, 4),
                          min_slots=2, chunk_steps=8, max_row_blocks=1 + 10)
    sched.admit()
    shard_of_row = {int(r): sched.shard_of(s) for s, r in enumerate(sched.slot_row)}
    done = np.full(8, 8, np.int32)
    still = np.array([True, False, False, False, False, False, True, False])
    plan = sched.plan_chunk(1)
    assert plan.compact_live == 2  # nothing waits: return once each shard fits 2 slots
    sched.record_chunk(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.float32), done, still,
                       np.zeros(8, bool))
    assert sched.compact() and sched.num_slots == 2
    for s, r in enumerate(sched.slot_row):
        assert r >= 0 and sched.shard_of(s) == shard_of_row[int(r)]
        assert sched.ctx_len[s] == 4 + 8 and sched.steps_done[s] == 8


def test_trainer_batch_through_few_slots_stays_in_its_pool():
    """256 prompts x 16 samples with lengths to the cap, 64 slots over 4 shards."""
    rng = np.random.default_rng(1)
    prompts = [[1] * int(k) for k in rng.integers(1, 40, 256)]
    lengths = np.minimum(rng.geometric(1 / 60, 256 * 16), 200)
    sched = SlotScheduler(prompts, n=16, max_new=200, slots=64, shards=4, block_size=16,
                          blocks_per_shard=SlotScheduler.pool_blocks_per_shard(16, 40, 200, 16),
                          min_slots=8, chunk_steps=32, max_row_blocks=3 + 13)
    simulate(sched, lengths)
    assert [len(t) for t in sched.tokens] == lengths.tolist()


def test_slot_counts_and_config_errors():
    worst = row_bytes(2, 2, 16, 4, 16, 24, 4)
    assert worst == (4 + 6) * 4 * 2 * 2 * 2 * 16 * 4
    assert decode_slots(BatchingConfig(), 64, 2, worst) == 64
    assert decode_slots(BatchingConfig(decode_slots=8), 64, 2, worst) == 8
    assert decode_slots(BatchingConfig(kv_cache_gb=5.5 * worst / 2**30), 64, 2, worst) == 10
    with pytest.raises(ValueError, match="rollout.kv_cache_gb.*holds no worst-case row"):
        decode_slots(BatchingConfig(kv_cache_gb=(worst - 1) / 2**30), 64, 2, worst)
    with pytest.raises(ValueError, match="decode_slots=3 must be a multiple of the 2"):
        decode_slots(BatchingConfig(decode_slots=3), 64, 2, worst)
    with pytest.raises(ValueError, match="rollout.batching='dynamic'"):
        BatchingConfig(mode="dynamic")
    with pytest.raises(ValueError, match="rollout.kv_block_size=0"):
        BatchingConfig(block_size=0)
