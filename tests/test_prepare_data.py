"""Dataset preparation (prorl_jax/prepare/, launchers/prepare_data.py) on fixture rows written in
each public source's documented layout (tests/fixtures/prepare/; see their converters' docstrings
for the schemas and where they come from)."""
import json
import os
import shutil
import sys
import types

import pytest
from fixtures.launcher import load_launcher

from prorl_jax.data import DataError, load_records, read_rows
from prorl_jax.prepare import code_sets, ifeval_sets, math_sets, stem_sets, templates
from prorl_jax.prepare.rows import convert_rows, read_local, summary_table
from prorl_jax.prepare.sources import SOURCES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "prepare")
prep = load_launcher("prepare_data")


def _convert(source, name, **options):
    return convert_rows(source, SOURCES[source].convert, read_local(os.path.join(FIXTURES, name)),
                        **options)


def test_deepscaler_json_list_skips_empty_answers():
    recs, report = _convert("deepscaler", "deepscaler.json")
    assert report.counts() == {"read": 4, "written": 3, "skipped": 1, "bad": 0}
    assert report.skipped == {"empty answer": 1}
    assert [r["answer"] for r in recs] == ["3", "\\frac{3}{4}", "4"]
    assert [r["id"] for r in recs] == ["deepscaler-0", "deepscaler-1", "deepscaler-3"]
    assert recs[0]["prompt"] == "What is $1+2$? " + templates.MATH_INSTRUCTION
    assert all(r["domain"] == "math" for r in recs)


def test_eurus_code_rows_joined_as_the_source_runner_does(tmp_path):
    recs, report = _convert("eurus_code", "eurus_code.jsonl")
    assert report.skipped == {"ability 'math' (not code)": 1, "no test cases": 1}
    # list-valued stdin input and expected stdout joined by "\n"; pretty-printed JSON read
    assert recs[0]["tests"] == {"inputs": ["1\n2", "5\n7\n"], "outputs": ["3", "12\n"]}
    assert recs[0]["prompt"][0]["role"] == "user"  # PRIME's system prompt dropped
    assert recs[0]["prompt"][0]["content"].endswith(templates.EURUS_CODE_INSTRUCTION)
    assert recs[1]["tests"] == {"fn_name": "minFlips", "inputs": [["001"], ["0001010111"]],
                                "outputs": [[1], [2]]}
    assert recs[0]["source"] == "taco"
    kept, _ = _convert("eurus_code", "eurus_code.jsonl", keep_system=True, max_tests=1)
    assert kept[0]["prompt"][0]["role"] == "system" and kept[0]["max_tests"] == 1
    # the source ships parquet: the same rows from a parquet file give the same records
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "eurus_code.jsonl"))]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "train.parquet"))
    from_parquet, _ = convert_rows("eurus_code", code_sets.convert_eurus_code,
                                   read_rows(str(tmp_path / "train.parquet")))
    assert from_parquet == recs


def test_eurus_call_based_string_inputs_are_json_lines():
    tests = code_sets.normalize_tests({"fn_name": "f", "inputs": ["[1, 2]\n3"], "outputs": [4]})
    assert tests["inputs"] == [[[1, 2], 3]]
    with pytest.raises(DataError, match=r"inputs\[0\]"):
        code_sets.normalize_tests({"inputs": [[1, 2]], "outputs": ["3"]})  # non-string lines


def test_scp116k_current_release_answers_from_extract_solution():
    recs, report = _convert("scp116k", "scp116k_current.jsonl")
    assert report.skipped == {"extract_solution is empty": 1}
    assert [r["answer"] for r in recs] == ["18", "6", "46"]  # "$6$" and "\\boxed{46}" cleaned
    assert [r["subject"] for r in recs] == ["Physical Chemistry", "Classical Mechanics",
                                            "Genetics"]
    assert recs[0]["prompt"].endswith(templates.STEM_INSTRUCTION)
    long, report = _convert("scp116k", "scp116k_current.jsonl", max_answer_chars=1)
    assert [r["answer"] for r in long] == ["6"] and sum(report.skipped.values()) == 3


def test_scp116k_original_release_uses_agreeing_model_answers():
    recs, report = _convert("scp116k", "scp116k_original.jsonl")
    # row 0: matched box; row 1: no box in the textbook solution, o1 agreed and boxed 2
    # (QwQ's box ignored: it disagreed); row 2: nothing boxed; row 3: matched box
    assert [r["answer"] for r in recs] == ["6\\,\\text{N}", "2", "46"]
    assert report.skipped == {
        "no \\boxed{} answer in matched_solution or an agreeing model solution": 1}
    agreed, report = _convert("scp116k", "scp116k_original.jsonl", require_agreement=True)
    assert [r["answer"] for r in agreed] == ["6\\,\\text{N}", "2"]
    assert report.skipped["no model solution agrees with the matched solution"] == 1


def test_scp116k_unknown_layout_names_the_fields(tmp_path):
    path = tmp_path / "scp.jsonl"
    path.write_text(json.dumps({"problem": "x?", "solution": "y"}) + "\n")
    with pytest.raises(DataError, match=r"scp.jsonl line 1: fields: expected SCP-116K's "
                                        r"'extract_solution'.*scp116k format"):
        convert_rows("scp116k", stem_sets.convert_scp116k, read_local(str(path)))


def test_nemotron_if_args_layout_and_instruction_mapping():
    recs, report = _convert("nemotron_if", "nemotron_if.jsonl")
    assert report.written == 3
    assert recs[0] == {"domain": "ifeval", "id": "nemotron_if-0", "source": "nemotron_if",
                       "prompt": "Write a haiku about rain. Do not use any commas in your "
                                 "response.",
                       "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    # union-schema None values dropped; None kwarg dicts -> {}
    assert recs[1]["kwargs"] == [{"num_words": 50, "relation": "at least"}, {},
                                 {"num_highlights": 2}]
    # a one-item `keywords` list is keywords:frequency's `keyword`
    assert recs[2]["kwargs"][1] == {"keyword": "cat", "frequency": 3, "relation": "at least"}
    # an unknown id is counted by name, never scored 0 silently
    assert report.skipped["unknown instruction id 'detectable_format:bigram_wrapping'"] == 1
    assert report.skipped["instruction 'length_constraints:number_words': kwarg "
                          "'capital_frequency' unknown to its check"] == 1
    with_system, _ = _convert("nemotron_if", "nemotron_if.jsonl", keep_system=True)
    assert with_system[0]["prompt"][0] == {"role": "system", "content": "detailed thinking off"}


def test_nemotron_kwargs_checked_against_the_graders_signatures():
    import rewards
    known = ifeval_sets.known_instructions()
    from rewards.ifeval_checks import CHECKS
    assert set(known) == set(CHECKS)
    assert known["keywords:frequency"][0] == {"keyword", "frequency", "relation"}
    with pytest.raises(Exception, match="kwarg 'num_words' missing"):
        ifeval_sets.map_instructions(["length_constraints:number_words"], [{"relation": "at least"}])
    # the mapped record scores as the graders intend: 2 of 3 instructions followed
    recs, _ = _convert("nemotron_if", "nemotron_if.jsonl")
    text = ("paris is the capital of france and one of the most visited cities in the world. "
            "it sits on the river seine and is known for its museums, its food and its long "
            "history. ") * 3 + "visitors love *the louvre* and *the eiffel tower*."
    assert rewards.score(recs[1], "</think>" + text) == pytest.approx(1.0)
    assert rewards.score(recs[1], "</think>" + text.upper()) == pytest.approx(2 / 3)


def test_ifeval_input_data_and_validation_math_sets():
    recs, report = _convert("ifeval_input", "ifeval_input_data.jsonl")
    assert report.written == 2 and [r["id"] for r in recs] == ["ifeval-1000", "ifeval-1001"]
    assert recs[0]["kwargs"] == [{}, {"num_highlights": 3}, {"relation": "at least",
                                                             "num_words": 300}]
    assert recs[1]["kwargs"] == [{}]
    aime, _ = _convert("aime", "aime.jsonl")
    assert [(r["id"], r["answer"]) for r in aime] == [("aime-60", "24"), ("aime-61", "42")]
    upper, report = _convert("aime", "aime_2024.jsonl")  # Problem/Answer, an int answer
    assert [r["answer"] for r in upper] == ["27"] and report.skipped == {"empty Answer": 1}
    assert upper[0]["prompt"] == math_sets.math_prompt("Compute $3^3$.")


def test_gpqa_choices_shuffled_deterministically_and_keyed():
    recs, _ = _convert("gpqa", "gpqa.csv")
    again, _ = _convert("gpqa", "gpqa.csv")
    assert recs == again
    for rec, correct in zip(recs, ["Neutron", "H2O"]):
        line = next(ln for ln in rec["prompt"].splitlines() if ln.startswith(rec["answer"] + "."))
        assert line == f"{rec['answer']}. {correct}"
    assert recs[0]["subject"] == "Particle physics"
    listed = stem_sets.convert_gpqa({"question": "2+2?", "choices": ["3", "4"], "answer": 1})
    assert listed["answer"] == "B" and "B. 4" in listed["prompt"]
    shuffled = [_convert("gpqa", "gpqa.csv", seed=s)[0][0]["answer"] for s in range(8)]
    assert len(set(shuffled)) > 1  # the seed moves the correct option


def test_humaneval_from_the_package_reads_every_check():
    recs, report = convert_rows("humaneval", code_sets.convert_humaneval,
                                code_sets.read_humaneval())
    assert report.read == 164 and report.written == 145
    assert report.skipped == {"a check that is not a literal call comparison": 19}
    first = recs[0]
    assert first["id"] == "HumanEval-0" and first["tests"]["fn_name"] == "has_close_elements"
    assert first["tests"]["inputs"][0] == [[1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3]
    assert first["tests"]["outputs"][:2] == [True, False]
    assert first["prompt"].endswith(templates.EURUS_CODE_INSTRUCTION)
    tests = code_sets.humaneval_tests(
        "def check(candidate):\n    assert abs(candidate(1.5) - 0.5) < 1e-6\n"
        "    assert not candidate(0)\n    assert candidate(2)\n    assert True\n")
    assert tests == {"inputs": [[1.5], [0], [2]], "outputs": [0.5, False, True]}


def test_humaneval_canonical_solutions_pass_their_converted_tests():
    """The converted tests agree with HumanEval's own: its canonical solutions score 1, a
    stub scores 0 (in the sandbox; the full 145 are checked in the README's figure)."""
    import rewards
    problems = {r["task_id"].replace("/", "-"): r for _, r in code_sets.read_humaneval()}
    recs, _ = convert_rows("humaneval", code_sets.convert_humaneval, code_sets.read_humaneval())
    recs = recs[:6]
    good = [f"</think>```python\n{problems[r['id']]['prompt']}"
            f"{problems[r['id']]['canonical_solution']}\n```" for r in recs]
    stub = [f"</think>```python\ndef {r['tests']['fn_name']}(*a):\n    return 12345\n```"
            for r in recs]
    scores = rewards.score_batch(recs + recs, good + stub, num_workers=1)
    assert scores == [1.0] * 6 + [0.0] * 6


def test_bad_rows_name_file_row_and_field_unless_skip_bad(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n"
                   + json.dumps({"problem": "", "answer": "2"}) + "\n"
                   + json.dumps({"problem": "x", "answer": [1]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: field 'problem'.*deepscaler format"):
        convert_rows("deepscaler", math_sets.convert_deepscaler, read_local(str(bad)))
    recs, report = convert_rows("deepscaler", math_sets.convert_deepscaler, read_local(str(bad)),
                                skip_bad=True)
    assert len(recs) == 1 and report.bad == {"field 'problem'": 1, "field 'answer'": 1}
    nem = tmp_path / "nem.jsonl"
    nem.write_text(json.dumps({"input": [{"role": "user", "content": "hi"}],
                               "args": {"instruction_id_list": ["punctuation:no_comma"] * 2,
                                        "instruction_kwargs": [{}]}}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'args.instruction_kwargs': expected a "
                                        r"list of 2"):
        convert_rows("nemotron_if", ifeval_sets.convert_nemotron_if, read_local(str(nem)))
    code = tmp_path / "code.jsonl"
    code.write_text(json.dumps({"ability": "code", "prompt": [{"role": "user", "content": "x"}],
                                "reward_model": {"ground_truth": "{not json"}}) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'reward_model.ground_truth': not valid"):
        convert_rows("eurus_code", code_sets.convert_eurus_code, read_local(str(code)))


def test_single_source_cli_and_summary_table(tmp_path, capsys):
    out = tmp_path / "math.jsonl"
    prep.main(["deepscaler", "--input", os.path.join(FIXTURES, "deepscaler.json"),
               "--out", str(out), "--limit", "2"])
    assert [r["answer"] for r in load_records(out)] == ["3", "\\frac{3}{4}"]
    table = capsys.readouterr().out
    assert "deepscaler" in table and str(out) in table
    with pytest.raises(DataError, match="not found"):
        prep.main(["deepscaler", "--input", str(tmp_path / "nope.jsonl"),
                   "--out", str(tmp_path / "o.jsonl")])
    _, report = _convert("nemotron_if", "nemotron_if.jsonl")
    text = summary_table([report])
    assert "nemotron_if: skipped 1: unknown instruction id 'detectable_format:bigram_wrapping'" \
        in text


def _input_dir(tmp_path):
    """Local copies in the layouts `all` reads (a hub snapshot directory for two of them)."""
    d = tmp_path / "in"
    (d / "eurus_code" / "data").mkdir(parents=True)
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "eurus_code.jsonl"))]
    pq.write_table(pa.Table.from_pylist(rows), str(d / "eurus_code" / "data" / "train.parquet"))
    pq.write_table(pa.Table.from_pylist(rows[:1]),
                   str(d / "eurus_code" / "data" / "validation.parquet"))  # not read
    nem = d / "nemotron_if" / "RL" / "instruction_following"
    nem.mkdir(parents=True)
    shutil.copy(os.path.join(FIXTURES, "nemotron_if.jsonl"), nem / "instruction_following.jsonl")
    shutil.copy(os.path.join(FIXTURES, "deepscaler.json"), d / "deepscaler.json")
    shutil.copy(os.path.join(FIXTURES, "scp116k_current.jsonl"), d / "scp116k.jsonl")
    shutil.copy(os.path.join(FIXTURES, "aime.jsonl"), d / "aime.jsonl")
    return d


def test_all_writes_the_five_domain_files_and_validation_sets(tmp_path, capsys):
    d, out = _input_dir(tmp_path), tmp_path / "data"
    reports = prep.main(["all", "--input_dir", str(d), "--out_dir", str(out), "--workers", "1",
                         "--logic_total", "6", "--val_logic_per_task", "2",
                         "--logic_tasks", "gcd,lcm,basic_arithmetic"])
    assert sorted(os.listdir(out)) == ["code.jsonl", "ifeval.jsonl", "logic.jsonl",
                                       "math.jsonl", "stem.jsonl", "val"]
    assert sorted(os.listdir(out / "val")) == ["aime.jsonl", "humaneval.jsonl", "logic.jsonl"]
    written = {r.source: r.written for r in reports}
    assert written == {"deepscaler": 3, "eurus_code": 2, "scp116k": 3, "nemotron_if": 3,
                       "reasoning_gym": 6, "aime": 2, "humaneval": 145,
                       "reasoning_gym_val": written["reasoning_gym_val"]}
    assert len(load_records(out / "code.jsonl")) == 2  # validation.parquet not read
    train_q = {r["entry"]["question"] for r in load_records(out / "logic.jsonl")}
    val_q = {r["entry"]["question"] for r in load_records(out / "val" / "logic.jsonl")}
    assert not train_q & val_q
    printed = capsys.readouterr().out
    assert "deepscaler: skipped 1: empty answer" in printed
    assert f"--config.data.train_files={out}/math.jsonl@40,{out}/code.jsonl@24" in printed
    (d / "scp116k.jsonl").unlink()
    with pytest.raises(DataError, match=r"no local copy of \['scp116k'\].*--hub"):
        prep.main(["all", "--input_dir", str(d), "--out_dir", str(out), "--no_val"])


def test_all_reads_missing_sources_from_the_hub(tmp_path, monkeypatch):
    """With --hub, a source with no local copy goes through datasets.load_dataset(name,
    config, split=...) (a stand-in module here: nothing can be downloaded)."""
    calls = []
    nem_rows = [json.loads(line) for line in open(os.path.join(FIXTURES, "nemotron_if.jsonl"))]

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return nem_rows
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    d, out = _input_dir(tmp_path), tmp_path / "data"
    shutil.rmtree(d / "nemotron_if")
    reports = prep.main(["all", "--input_dir", str(d), "--out_dir", str(out), "--hub",
                         "--domains", "ifeval", "--no_val"])
    assert calls == [("nvidia/Llama-Nemotron-Post-Training-Dataset", "RL",
                      "instruction_following")]
    assert [r.written for r in reports] == [3]


def test_paper_sizes_subsets_and_hub_overrides(tmp_path, monkeypatch):
    from prorl_jax.prepare import pipeline
    out = tmp_path / "math.jsonl"
    report = pipeline.run_source(SOURCES["deepscaler"], os.path.join(FIXTURES, "deepscaler.json"),
                                 str(out), max_records=2, seed=3)
    again = pipeline.run_source(SOURCES["deepscaler"], os.path.join(FIXTURES, "deepscaler.json"),
                                str(tmp_path / "again.jsonl"), max_records=2, seed=3)
    recs = load_records(out)
    assert report.written == 2 and report.skipped["beyond the paper's 2 (seeded subset)"] == 1
    assert recs == load_records(tmp_path / "again.jsonl") and again.written == 2
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda name, config=None, split=None: calls.append((name, config, split))
        or [{"Question": "q?", "Correct Answer": "a", "Incorrect Answer 1": "b"}]))
    prep.main(["gpqa", "--input", "Idavidrein/gpqa", "--hf_config", "gpqa_main",
               "--out", str(tmp_path / "gpqa.jsonl")])
    assert calls == [("Idavidrein/gpqa", "gpqa_main", "train")]
