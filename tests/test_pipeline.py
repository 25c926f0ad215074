"""The rollout pipeline (prorl_jax/pipeline) with the embedded JaxSampler: the schedule (the
batch of step t by weight version max(floor, t - k)), k = 0 as the synchronous loop call for
call, exact resume after SIGTERM and SIGKILL with batches in flight, the drop rule, and the
parts (checkpoint packing, the background scorer)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import prorl
from prorl_jax import batching
from prorl_jax.pipeline import GroupScorer, InlinePipeline, ScoredBatch, round_seed
from prorl_jax.pipeline.batches import pack_batch, unpack_batch
from prorl_jax.rollout.jax_sampler import JaxSampler
from prorl_jax.trainer import Trainer
from test_trainer import _KillAt, deterministic, read_metrics, small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("trainer_compile_cache")  # conftest.py


# ---- the parts -------------------------------------------------------------------------------

class _Iter:
    def __init__(self):
        self.dataset = None

    def state_dict(self):
        return {"drawn": 0}


def test_schedule_versions_floor_and_which_versions_are_needed():
    p = InlinePipeline(None, _Iter(), None, None, copy_weights=None, max_staleness=2,
                       total_steps=10, seed=0, stop_ids=[0])
    assert [p.version_of(t) for t in range(6)] == [0, 0, 0, 1, 2, 3]
    assert p.needs_version(7) and not p.needs_version(8)  # batch 9 is version 7's
    p.floor = 4  # resumed at step 4: the batches before step 6 by the restored version 4
    assert [p.version_of(t) for t in range(4, 9)] == [4, 4, 4, 5, 6]
    assert not p.needs_version(3)
    p.close()


def _group(seed: int, n: int = 2) -> batching.Group:
    rng = np.random.default_rng(seed)
    responses = [rng.integers(0, 50, rng.integers(1, 4)).tolist() for _ in range(n)]
    return batching.Group({"domain": "toy", "id": seed}, [1, 2, seed], responses,
                          [rng.normal(size=len(r)).astype(np.float32) for r in responses],
                          ["stop", "length"][:n], rng.random(n).astype(np.float32),
                          rng.random(n).astype(np.float32))


def test_packed_batches_come_back_exactly_with_their_records():
    groups = [_group(3), _group(4)]
    records = [[{"domain": "toy", "id": 9}], [None, None, None, groups[0].record,
                                               groups[1].record]]
    dataset = type("D", (), {"sources": [type("S", (), {"records": r}) for r in records]})
    batch = ScoredBatch(7, 6, groups, [(1, 3), (1, 4)], {"reward/mean": 0.25}, {"drawn": 12})
    back = unpack_batch(pack_batch(batch), json.loads(json.dumps(batch.meta())), dataset)
    assert (back.step, back.weight_version, back.refs, back.stats, back.data_state) == (
        7, 6, [(1, 3), (1, 4)], {"reward/mean": 0.25}, {"drawn": 12})
    for a, b in zip(groups, back.groups):
        assert a.record is b.record and a.prompt_ids == b.prompt_ids
        assert a.response_ids == b.response_ids and a.finish_reasons == b.finish_reasons
        for x, y in zip(a.logprobs, b.logprobs):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(a.rewards, b.rewards)
        np.testing.assert_array_equal(a.raw_rewards, b.raw_rewards)
    empty = ScoredBatch(8, 7, [], [], {}, {})  # dynamic sampling kept nothing
    blob = pack_batch(empty)
    assert blob.size > 0 and unpack_batch(blob, empty.meta(), dataset).groups == []


def test_group_scorer_scores_what_is_queued_in_one_call_and_passes_errors_on():
    calls, busy, release = [], threading.Event(), threading.Event()

    def score_items(records, ids):
        calls.append(len(records))
        busy.set()
        release.wait(10)  # the first call is busy while the next three are queued
        if any(r == "bad" for r in records):
            raise ValueError("verifier broke")
        return (np.array([len(i) for i in ids], np.float32),
                np.array([r == "slow" for r in records]))
    scorer = GroupScorer(score_items)
    first = scorer.submit(["a"], [[1]])
    assert busy.wait(10)
    rest = [scorer.submit(["a", "slow"], [[1, 2], [3]]) for _ in range(3)]
    release.set()
    rewards, failures = rest[1].result(timeout=10)
    np.testing.assert_array_equal(rewards, [2.0, 1.0])
    assert failures == 1 and first.result()[1] == 0
    assert calls == [1, 6]  # the three queued submissions went together
    with pytest.raises(ValueError, match="verifier broke"):
        scorer.submit(["bad"], [[1]]).result(timeout=10)
    scorer.close()


# ---- the loop ----------------------------------------------------------------------------------

def _record_sampler(monkeypatch) -> list:
    """Records the JaxSampler's calls: ("update", version) and ("generate", seed, prompts,
    the version it samples from)."""
    calls = []
    generate, update = JaxSampler.generate, JaxSampler.update_weights

    def recorded_generate(self, prompts, **kw):
        calls.append(("generate", kw["seed"], [list(p) for p in prompts], self.weight_version))
        return generate(self, prompts, **kw)

    def recorded_update(self, params, version):
        calls.append(("update", version))
        return update(self, params, version)
    monkeypatch.setattr(JaxSampler, "generate", recorded_generate)
    monkeypatch.setattr(JaxSampler, "update_weights", recorded_update)
    return calls


def _batch_of_seed(cfg, steps: int) -> dict:
    """The round seed of every (step, round) of the run -> (step, round)."""
    return {round_seed(cfg.seed, t, r): (t, r) for t in range(steps)
            for r in range(cfg.batch.max_generation_rounds)}


def test_k0_is_the_synchronous_loop_call_for_call(tmp_path, monkeypatch):
    """At k = 0 the engine sees exactly the calls of the loop before the pipeline: the start-up
    sync, each round of step t with seed (seed, t, round) on the next prompts of the data order
    and the weights of step t, the sync of version t + 1 after each update (none after a
    skipped step), validation on the latest weights."""
    cfg = small_config(**{"total_steps": 3, "batch.dynamic_sampling": True,
                          "batch.max_generation_rounds": 2, "eval.every_steps": 2,
                          "checkpoint.every_steps": 0})
    calls = _record_sampler(monkeypatch)
    trainer = Trainer(cfg, str(tmp_path))
    trainer.run()
    trainer.close()
    rows = read_metrics(str(tmp_path))
    prompts, val = trainer.train_data.iterator(), trainer.val_data.all_prompts()
    b, e, version = trainer.settings.batch, trainer.settings.eval, 0
    expected = [("update", 0)]
    for t, row in enumerate(rows):
        for r in range(row["dynamic_sampling/rounds"]):
            ids = [p.prompt_ids for p in prompts.next_batch(b.prompts_per_round)]
            expected.append(("generate", round_seed(cfg.seed, t, r), ids, version))
        if not row.get("skipped"):
            version = t + 1
            expected.append(("update", version))
        if (t + 1) % e.every_steps == 0 or t + 1 == cfg.total_steps:
            for start in range(0, min(e.max_problems, len(val)), b.prompts_per_step):
                part = val[start:start + b.prompts_per_step]
                expected.append(("generate", round_seed(cfg.seed, t + 1, 997) + start,
                                 [p.prompt_ids for p in part], version))
    assert [r["dynamic_sampling/rounds"] for r in rows] != [1, 1, 1]  # refills were tested
    assert calls == expected
    assert [r["rollout/staleness"] for r in rows] == [0, 0, 0]


def _generate_versions(calls: list, cfg, steps: int) -> dict:
    """(step, round) -> the weight version the sampler generated it with."""
    seeds = _batch_of_seed(cfg, steps)
    return {seeds[c[1]]: c[3] for c in calls if c[0] == "generate" and c[1] in seeds}


def _params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.state.params))]


def _same_run(a_dir, b_dir, a_params, b_params):
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [deterministic(r) for r in a] == [deterministic(r) for r in b]
    assert all(np.array_equal(x, y) for x, y in zip(a_params, b_params))


def test_embedded_k1_schedule_sigterm_resume_and_the_drop_rule(tmp_path, monkeypatch):
    """k = 1 with the embedded sampler: every round of the batch of step t (dynamic sampling
    refills included, which run after step t - 1's update donated its weights) is generated by
    version max(0, t - 1); killed by SIGTERM during step 2 the checkpoint (step 3) carries
    batch 3 and the resumed run is the uninterrupted one; the same checkpoint resumed at k = 0
    drops that batch (staleness 1 > 0), counts it and regenerates it from the same prompts."""
    cfg = small_config(**{"total_steps": 4, "rollout.max_staleness": 1,
                          "batch.dynamic_sampling": True, "batch.max_generation_rounds": 2})
    calls = _record_sampler(monkeypatch)
    straight = Trainer(cfg, str(tmp_path / "a"))
    assert isinstance(straight.pipeline, InlinePipeline)
    straight.run()
    straight.close()
    versions = _generate_versions(calls, cfg, 4)
    rows = read_metrics(str(tmp_path / "a"))
    assert any(r > 0 for _, r in versions)  # refill rounds ran
    assert versions == {(t, r): max(0, t - 1) for t, r in versions}
    assert [r["rollout/staleness"] for r in rows] == [0, 1, 1, 1]
    assert [r["rollout/weight_version"] for r in rows] == [0, 0, 1, 2]
    straight_prompts = {c[1]: c[2] for c in calls if c[0] == "generate"}
    killed = _KillAt(cfg, str(tmp_path / "b"))
    killed.kill_step = 2
    killed.run()
    killed.close()
    assert killed.step == 3
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    resumed = Trainer(cfg, str(tmp_path / "b"))
    resumed.run()
    resumed.close()
    _same_run(str(tmp_path / "a"), str(tmp_path / "b"), _params(straight), _params(resumed))
    calls.clear()
    k0 = Trainer(small_config(**{"total_steps": 4, "batch.dynamic_sampling": True,
                                 "batch.max_generation_rounds": 2}), str(tmp_path / "c"))
    k0.run()
    k0.close()
    last = read_metrics(str(tmp_path / "c"))[-1]
    assert (last["rollout/dropped_stale"], last["rollout/staleness"],
            last["rollout/weight_version"]) == (1, 0, 3)
    seed = round_seed(cfg.seed, 3, 0)
    regenerated = [c for c in calls if c[0] == "generate" and c[1] == seed]
    assert regenerated[0][2] == straight_prompts[seed] and regenerated[0][3] == 3


def _flags(cfg) -> list[str]:
    """--config.<key>=<value> for every field where `cfg` differs from the demo preset."""
    def flat(node, prefix=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    demo = dict(flat(prorl.get_config("demo")))
    return [f"--config.{k}={v}" for k, v in flat(cfg) if demo[k] != v]


def test_sigkill_after_a_checkpoint_resumes_to_the_uninterrupted_run_k2(tmp_path,
                                                                       _trainer_cache_dir):
    """k = 2: `python -m prorl_jax.main` killed with SIGKILL once step 3 is logged (the
    checkpoint of step 2 holds batches 2 and 3, generated by version 0 and 1); resuming it
    gives the uninterrupted run's metrics and weights."""
    cfg = small_config(**{"total_steps": 5, "rollout.max_staleness": 2,
                          "eval.every_steps": 0, "batch.dynamic_sampling": True,
                          "batch.max_generation_rounds": 2})
    straight = Trainer(cfg, str(tmp_path / "a"))
    straight.run()
    straight.close()
    assert [r["rollout/staleness"] for r in read_metrics(str(tmp_path / "a"))] == [0, 1, 2, 2, 2]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=_trainer_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    workdir = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "prorl_jax.main",
                             "--config=configs/prorl.py:demo", f"--workdir={workdir}",
                             *_flags(cfg)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not _logged(workdir, 3):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert "2" in os.listdir(workdir / "checkpoints")  # (4 too if step 4 ended first)
    extra = json.load(open(workdir / "checkpoints" / "2" / "extra" / "metadata"))
    assert [(b["step"], b["weight_version"]) for b in extra["pipeline"]["batches"]] == [(2, 0),
                                                                                        (3, 1)]
    resumed = Trainer(cfg, str(workdir))
    resumed.run()
    resumed.close()
    _same_run(str(tmp_path / "a"), str(workdir), _params(straight), _params(resumed))


def _logged(workdir, step: int) -> bool:
    try:
        with open(workdir / "metrics.jsonl") as f:
            return any(json.loads(line)["step"] >= step for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return False
