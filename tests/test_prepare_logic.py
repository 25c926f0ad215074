"""The logic set: the recorded reasoning-gym reliability scan, re-checked on a few tasks, and the
generator (task list, seeds, held-out validation problems, prompts)."""
import json

import pytest

import rewards
from prorl_jax.data import DataError
from prorl_jax.prepare import logic_scan, logic_sets, templates


@pytest.fixture(scope="module")
def record():
    return logic_scan.load_record()


def test_record_covers_every_task_of_the_installed_reasoning_gym(record):
    import reasoning_gym.factory
    assert record["reasoning_gym_version"] == logic_scan.reasoning_gym_version()
    assert set(record["kept"]) | set(record["excluded"]) == set(reasoning_gym.factory.DATASETS)
    assert not set(record["kept"]) & set(record["excluded"])
    assert len(record["kept"]) >= 90  # ProRL: 96 tasks
    assert set(rewards.logic_grader.EXCLUDED_TASKS) <= set(record["excluded"])
    assert {"graph_color", "sudoku", "family_relationships"} <= set(record["kept"])


@pytest.mark.parametrize("task, verdict", [
    ("gcd", ""),
    ("graph_color", ""),                       # verifier task: checked with metadata example
    ("ab", ""),                                # some oracles are empty: not an "empty" failure
    ("puzzle24", ""),                          # the graders' own scorer: the puzzle's numbers
    ("list_functions", "not deterministic"),
    ("propositional_logic", "excluded by rewards.logic_grader.EXCLUDED_TASKS"),
    ("rush_hour", "no reference answer"),
    ("game_of_life_halting", "excluded by rewards.logic_grader.EXCLUDED_TASKS"),
])
def test_scan_reproduces_the_record(task, verdict, record):
    scan = logic_scan.scan_task(task, size=6, seed=0)
    assert scan.kept == (verdict == "") == (task in record["kept"])
    assert verdict in scan.reason
    if scan.kept:
        assert scan.reference_min == 1.0 and scan.empty_max <= logic_scan.WRONG_MAX


def test_task_list_follows_the_graders_exclusions_at_run_time(monkeypatch):
    tasks, excluded = logic_sets.logic_tasks()
    assert "gcd" in tasks and "list_functions" not in tasks and "list_functions" in excluded
    monkeypatch.setattr(rewards.logic_grader, "EXCLUDED_TASKS", frozenset({"gcd"}))
    tasks, excluded = logic_sets.logic_tasks()
    assert "gcd" not in tasks and "gcd" in excluded
    with pytest.raises(DataError, match="'gcd': excluded"):
        logic_sets.logic_tasks(["gcd"])
    with pytest.raises(DataError, match="'list_functions': excluded .*not deterministic"):
        logic_sets.logic_tasks(["list_functions"])
    with pytest.raises(DataError, match="'no_such_task': unknown"):
        logic_sets.logic_tasks(["no_such_task"])


def test_generation_seeds_per_task_and_prompts():
    both, report = logic_sets.generate_logic(["gcd", "lcm"], size=3, seed=5)
    alone, _ = logic_sets.generate_logic(["lcm"], size=3, seed=5)
    assert report.written == 6 and [r["task"] for r in both] == ["gcd"] * 3 + ["lcm"] * 3
    assert [r["entry"] for r in both[3:]] == [r["entry"] for r in alone]  # list-independent
    other, _ = logic_sets.generate_logic(["lcm"], size=3, seed=6)
    assert [r["entry"] for r in other] != [r["entry"] for r in alone]
    rec = both[0]
    assert rec["prompt"] == [{"role": "system", "content": templates.logic_system_prompt()},
                             {"role": "user", "content": rec["entry"]["question"]}]
    assert "<answer>" in rec["prompt"][0]["content"]
    oracle = f"</think><answer>{rec['entry']['answer']}</answer>"
    assert rewards.score(json.loads(json.dumps(rec)), oracle) == 1.0
    assert logic_sets.sizes_per_task(["a", "b", "c"], 8) == [3, 3, 2]


def test_held_out_set_drops_training_questions():
    train, _ = logic_sets.generate_logic(["gcd"], size=4, seed=0)
    # the same seed would repeat every problem: all are dropped and counted
    val, report = logic_sets.generate_logic(["gcd"], size=4, seed=0,
                                            exclude_questions=logic_sets.questions_of(train))
    assert val == [] and report.skipped == {"question also in the training set": 4}
    val, report = logic_sets.generate_logic(["gcd"], size=4, seed=logic_sets.VAL_SEED,
                                            exclude_questions=logic_sets.questions_of(train))
    assert report.written == 4
