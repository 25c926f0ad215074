"""Dataset preparation (launchers/prepare_data.py) on small fixture rows written in each public
source's own format (tests/fixtures/prepare/)."""
import json
import os

import pytest
from fixtures.launcher import load_launcher

from prorl_jax.data import DataError, load_records, read_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "prepare")




prep = load_launcher("prepare_data")


def _convert(source, name, **kw):
    return prep.convert_rows(source, read_rows(os.path.join(FIXTURES, name)), **kw)


def test_deepscaler_rows_become_math_records(tmp_path):
    out = tmp_path / "math.jsonl"
    prep.main(["deepscaler", "--input", os.path.join(FIXTURES, "deepscaler.jsonl"),
               "--out", str(out)])
    recs = load_records(out)
    assert [r["answer"] for r in recs] == ["3", "\\frac{3}{4}", "4"]
    assert all(r["domain"] == "math" for r in recs)
    assert recs[0]["prompt"] == "What is $1+2$? " + prep.MATH_INSTRUCTION
    assert [r["id"] for r in recs] == ["deepscaler-0", "deepscaler-1", "deepscaler-2"]


def test_eurus_code_rows_become_code_records(tmp_path):
    recs, counts = _convert("eurus_code", "eurus_code.jsonl")
    assert counts == {"read": 3, "written": 2, "skipped": 1, "bad": 0}  # the math row skipped
    assert recs[0]["tests"] == {"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]}
    assert recs[0]["prompt"] == [{"role": "user",
                                  "content": "Read two integers and print their sum."}]
    assert recs[1]["tests"] == {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 7]}
    with_system, _ = _convert("eurus_code", "eurus_code.jsonl", keep_system=True)
    assert with_system[0]["prompt"][0]["role"] == "system"


def test_eurus_parquet_input_matches_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "eurus_code.jsonl"))]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "eurus.parquet"))
    recs, _ = prep.convert_rows("eurus_code", read_rows(str(tmp_path / "eurus.parquet")))
    assert recs == _convert("eurus_code", "eurus_code.jsonl")[0]


def test_scp116k_answers_from_boxed_matched_solution():
    recs, counts = _convert("scp116k", "scp116k.jsonl")
    assert counts["written"] == 2 and counts["skipped"] == 1  # no \boxed{} in row 1
    assert [r["answer"] for r in recs] == ["6\\,\\text{N}", "46"]
    assert [r["subject"] for r in recs] == ["physics", "biology"]
    assert all(r["domain"] == "stem" for r in recs)
    agreed, counts = _convert("scp116k", "scp116k.jsonl", require_agreement=True)
    assert [r["answer"] for r in agreed] == ["6\\,\\text{N}"] and counts["skipped"] == 2


def test_nemotron_if_rows_become_ifeval_records():
    recs, counts = _convert("nemotron_if", "nemotron_if.jsonl")
    assert counts["written"] == 2
    assert recs[0]["instruction_id_list"] == ["punctuation:no_comma"]
    assert recs[0]["kwargs"] == [{}]
    assert recs[1]["prompt"][0]["role"] == "user"
    assert recs[1]["kwargs"] == [{"relation": "at least", "num_words": 50}, {}]  # None dropped


def test_bad_rows_name_row_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n"
                   + json.dumps({"problem": "", "answer": "2"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: field 'problem'.*deepscaler format"):
        prep.convert_rows("deepscaler", read_rows(str(bad)))
    recs, counts = prep.convert_rows("deepscaler", read_rows(str(bad)), skip_bad=True)
    assert len(recs) == 1 and counts["bad"] == 1
    code = tmp_path / "code.jsonl"
    code.write_text(json.dumps({"ability": "code", "prompt": [{"role": "user", "content": "x"}],
                                "reward_model": {"ground_truth": json.dumps(
                                    {"inputs": ["1"], "outputs": []})}}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'reward_model.ground_truth'"):
        prep.convert_rows("eurus_code", read_rows(str(code)))
    ifv = tmp_path / "if.jsonl"
    ifv.write_text(json.dumps({"prompt": "hi", "instruction_id_list": ["a:b", "c:d"],
                               "kwargs": [{}]}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'kwargs': expected a list of 2"):
        prep.convert_rows("nemotron_if", read_rows(str(ifv)))


def test_limit_stops_early():
    recs, counts = _convert("deepscaler", "deepscaler.jsonl", limit=2)
    assert len(recs) == 2 and counts["read"] == 2


def test_reasoning_gym_generation(tmp_path):
    import reasoning_gym  # a test dependency (pip install reasoning-gym)
    out = tmp_path / "logic.jsonl"
    prep.main(["reasoning_gym", "--tasks", "family_relationships,graph_color", "--size", "3",
               "--seed", "5", "--out", str(out)])
    recs = load_records(out)
    assert [r["task"] for r in recs] == ["family_relationships"] * 3 + ["graph_color"] * 3
    assert recs == prep.generate_reasoning_gym(["family_relationships", "graph_color"], 3, 5)
    for r in recs:
        assert r["domain"] == "logic" and r["prompt"].endswith(prep.LOGIC_INSTRUCTION)
        assert r["prompt"].startswith(r["entry"]["question"])
        # the entry survives JSON and still scores its own oracle answer as correct
        if r["entry"]["answer"] is not None:
            score = reasoning_gym.get_score_answer_fn(r["task"])(r["entry"]["answer"], r["entry"])
            assert score == 1.0
    with pytest.raises(DataError, match="game_of_life_halting"):
        prep.generate_reasoning_gym(["game_of_life_halting"], 1, 0)
    with pytest.raises(DataError, match="no_such_task"):
        prep.generate_reasoning_gym(["no_such_task"], 1, 0)


def test_missing_input_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        prep.main(["deepscaler", "--input", str(tmp_path / "nope.jsonl"),
                   "--out", str(tmp_path / "o.jsonl")])
