"""rewards: registry, answer extraction, score/score_batch contract, worker-pool robustness."""
import os
import signal
import time

import pytest

import rewards
from rewards import extract
from rewards.pool import RewardPool


# Test-only domains (module level so worker processes can import them by reference).
@rewards.register("test_echo", required_fields=("value",))
def _echo(record, answer):
    return float(record["value"]) if answer.strip() == "ok" else 0.0


@rewards.register("test_hang", required_fields=())
def _hang(record, answer):
    if answer.strip() == "hang":
        time.sleep(60)
    return 1.0


@rewards.register("test_crash", required_fields=())
def _crash(record, answer):
    if answer.strip() == "raise":
        raise RuntimeError("checker bug")
    if answer.strip() == "exit":
        os._exit(3)  # kills the worker process itself
    if answer.strip() == "nan":
        return float("nan")
    if answer.strip() == "alloc":
        return len(bytearray(20 << 30))  # 20 GiB: over the worker's address-space cap
    return 1.0


@rewards.register("test_no_sandbox", required_fields=())
def _no_sandbox(record, answer):
    raise rewards.SandboxUnavailableError("bwrap vanished")


@pytest.fixture(scope="module")
def pool():
    with RewardPool(2) as p:
        yield p


def test_answer_region_think_modes():
    assert extract.answer_region("<think>a</think>x</think> final", "require") == " final"
    assert extract.answer_region("no closing tag", "require") is None
    assert extract.answer_region("no closing tag", "optional") == "no closing tag"
    with pytest.raises(ValueError, match="think_mode"):
        extract.answer_region("x", "sometimes")


def test_last_boxed_brace_matching():
    assert extract.last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract.last_boxed(r"\boxed{a{b}c}") == "a{b}c"
    assert extract.last_boxed(r"\boxed{2} and \boxed{unclosed") == "2"
    assert extract.last_boxed("no box") is None
    assert extract.last_boxed(r"\fbox{7}") == "7"


def test_last_code_block_and_tag():
    text = "```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```\n```\nnot python\n```"
    assert extract.last_code_block(text) == "print(2)\n"
    assert extract.last_code_block("no code") is None
    assert extract.last_tagged("<answer>1</answer> <answer> 2 </answer>") == "2"


def test_record_errors_name_the_field():
    with pytest.raises(rewards.RecordError, match="'domain'"):
        rewards.score({"answer": "1"}, "</think>x")
    with pytest.raises(rewards.RecordError, match="unknown domain 'chess'"):
        rewards.score({"domain": "chess"}, "</think>x")
    with pytest.raises(rewards.RecordError, match="missing field 'answer'"):
        rewards.score({"domain": "math"}, "</think>x")
    with pytest.raises(rewards.RecordError, match="record 1 .*'tests.outputs'"):
        rewards.score_batch([{"domain": "math", "answer": "1"},
                             {"domain": "code", "tests": {"inputs": ["1"]}}], ["a", "b"])
    with pytest.raises(ValueError, match="2 records but 1 responses"):
        rewards.score_batch([{"domain": "math", "answer": "1"}] * 2, ["a"])


def test_register_rejects_a_second_function():
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("math", required_fields=("answer",))(lambda r, a: 1.0)


def test_score_in_process_and_think_mode():
    rec = {"domain": "test_echo", "value": 0.25}
    assert rewards.score(rec, "<think>hm</think>ok") == 0.25
    assert rewards.score(rec, "ok") == 0.0  # no </think>: unanswered
    assert rewards.score(rec, "ok", think_mode="optional") == 0.25
    assert rewards.score({"domain": "test_crash"}, "</think>raise") == 0.0


def test_score_batch_statuses_and_reuse(pool):
    recs = [{"domain": "test_echo", "value": v} for v in (0.5, 1.0, 2.0, -1.0)]
    resps = ["</think>ok", "</think>no", "</think>ok", "ok"]
    r, d = pool.score_batch(recs, resps, return_details=True)
    assert r == [0.5, 0.0, 1.0, 0.0]  # 2.0 clipped to 1; no </think> -> unanswered
    assert d.status == ["ok", "ok", "ok", "unanswered"]
    pids = sorted(pool.worker_pids())
    r2 = pool.score_batch(recs * 10, resps * 10)
    assert r2 == r * 10
    assert sorted(pool.worker_pids()) == pids  # same workers reused


def test_crashing_checkers_give_zero_and_a_count(pool):
    answers = ["fine", "raise", "nan", "exit", "alloc", "fine"]
    recs = [{"domain": "test_crash"}] * len(answers)
    r, d = pool.score_batch(recs, ["</think>" + a for a in answers], return_details=True)
    assert r == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert d.status == ["ok", "crash", "crash", "crash", "crash", "ok"]
    assert d.num_crashed == 4
    assert pool.score_batch(recs[:1], ["</think>fine"]) == [1.0]  # pool still usable


def test_worker_killed_between_calls_is_replaced(pool):
    os.kill(pool.worker_pids()[0], signal.SIGKILL)
    time.sleep(0.2)
    recs = [{"domain": "test_echo", "value": 1.0}] * 8
    assert pool.score_batch(recs, ["</think>ok"] * 8) == [1.0] * 8


def test_hanging_checker_cannot_stall_the_batch(pool):
    answers = ["x", "hang", "x", "x", "hang", "x"]
    t0 = time.monotonic()
    r, d = pool.score_batch([{"domain": "test_hang"}] * 6, ["</think>" + a for a in answers],
                            timeout_s=1.0, return_details=True)
    elapsed = time.monotonic() - t0
    assert r == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert d.num_timed_out == 2 and d.status[1] == "timeout"
    assert elapsed < 8.0, elapsed
    assert pool.score_batch([{"domain": "test_hang"}], ["</think>x"]) == [1.0]


def test_module_level_score_batch_uses_shared_pool():
    recs = [{"domain": "math", "answer": "2"}, {"domain": "toy", "answer": "7"}]
    assert rewards.score_batch(recs, [r"</think>\boxed{2}", "</think>7"]) == [1.0, 1.0]
    assert rewards.default_pool() is rewards.default_pool()


def test_pool_works_from_a_process_with_jax_initialised():
    import jax.numpy as jnp  # a hard dependency of the project

    assert float(jnp.arange(4.0).sum()) == 6.0  # JAX runtime (threads) started in this process
    with RewardPool(1) as p:
        assert p.score_batch([{"domain": "test_echo", "value": 0.75}], ["</think>ok"]) == [0.75]


def test_bench_script_runs_on_a_tiny_batch(capsys):
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "rewards.py"
    spec = importlib.util.spec_from_file_location("bench_rewards", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    records, responses = bench.math_batch(32, __import__("random").Random(1))
    assert len(records) == 32 and all(r["domain"] == "math" for r in records)
    old_argv = sys.argv
    sys.argv = ["rewards.py", "--num-math", "32", "--num-code", "2", "--workers", "1",
                "--worst-chars", "3000", "--worst-domains", "code,ifeval"]  # math: ~3 s alarms
    try:
        bench.main()
    finally:
        sys.argv = old_argv
    out = capsys.readouterr().out
    assert '"math"' in out and '"code"' in out and '"num_crashed": 0' in out
    assert "worst case ifeval" in out and '"worst_case"' in out


def test_time_limits_respect_a_domains_own_budget():
    from rewards.registry import DEFAULT_TIMEOUT_S, get_domain

    echo = get_domain({"domain": "test_echo", "value": 1})
    assert echo.time_limit_s({}) == DEFAULT_TIMEOUT_S and echo.time_limit_s({}, 2.5) == 2.5
    code = {"domain": "code", "tests": {"inputs": ["1"] * 10, "outputs": ["1"] * 10}}
    own = get_domain(code).time_limit_s(code)
    assert own > 10.0  # ten tests at 4 s within a 20 s response budget, plus start-up
    assert get_domain(code).time_limit_s(code, 1.0) == own
    assert get_domain(code).time_limit_s(code, 1000.0) == 1000.0


def test_details_expose_the_counts_the_trainer_reads(pool):
    _, d = pool.score_batch([{"domain": "test_crash"}] * 2, ["</think>raise", "</think>fine"],
                            return_details=True)
    assert (d.num_crashed, d.num_timed_out, d.as_dict()["num_crashed"]) == (1, 0, 1)


def test_missing_sandbox_inside_a_worker_raises_and_the_pool_recovers(pool):
    recs = [{"domain": "test_echo", "value": 1.0}] * 4 + [{"domain": "test_no_sandbox"}]
    with pytest.raises(rewards.SandboxUnavailableError, match="bwrap vanished"):
        pool.score_batch(recs, ["</think>ok"] * 5)
    assert pool.score_batch(recs[:4], ["</think>ok"] * 4) == [1.0] * 4  # no stale results
