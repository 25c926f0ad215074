"""Data pipeline: record loading and validation, chat-template tokenisation, over-long dropping,
weighted mixing, deterministic order and exact resumption (prorl_jax/data.py)."""
import json
import os

import numpy as np
import pytest

from prorl_jax import data
from prorl_jax.data import DataError, PromptDataset, load_records

TOKENIZER_DIR = os.path.join(os.path.dirname(data.__file__), "assets", "demo_tokenizer")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _vocab():
    with open(os.path.join(TOKENIZER_DIR, "tokenizer.json")) as f:
        return json.load(f)["model"]["vocab"]


def _expected_chat_ids(user_text, system_text=None):
    """Independent ChatML rendering + char-level lookup in the saved vocabulary."""
    v = _vocab()
    ids = []

    def turn(role, content):
        ids.extend([v["<|im_start|>"]] + [v[c] for c in role + "\n" + content]
                   + [v["<|im_end|>"], v["\n"]])
    if system_text is not None:
        turn("system", system_text)
    turn("user", user_text)
    ids.extend([v["<|im_start|>"]] + [v[c] for c in "assistant\n"])
    return ids


def _toy(i, prompt=None, **extra):
    rec = {"domain": "toy", "prompt": prompt or f"copy {i % 10}", "answer": str(i % 10),
           "id": f"r{i}"}
    rec.update(extra)
    return rec


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ---------------------------------------------------------------- loading and validation

def test_load_records_jsonl_json_parquet_agree(tmp_path):
    rows = [_toy(i) for i in range(5)] + [
        {"domain": "math", "prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}]
    jl = _write_jsonl(tmp_path / "a.jsonl", rows[:3] + [""] + rows[3:])  # blank line skipped
    js = tmp_path / "a.json"
    js.write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq_path = str(tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:5]), pq_path)
    assert load_records(jl) == rows
    assert load_records(js) == rows
    assert load_records(pq_path) == rows[:5]


@pytest.mark.parametrize("row, field", [
    ({"prompt": "copy 1", "answer": "1"}, "'domain'"),
    ({"domain": "toy", "answer": "1"}, "'prompt'"),
    ({"domain": "toy", "prompt": 7, "answer": "1"}, "'prompt'"),
    ({"domain": "toy", "prompt": [{"role": "bot", "content": "x"}], "answer": "1"},
     "'prompt' message 0"),
    ({"domain": "toy", "prompt": "copy 1"}, "missing field 'answer'"),
    ({"domain": "code", "prompt": "write f"}, "missing field 'tests'"),
    ({"domain": "no_such_domain", "prompt": "x"}, "'domain'"),
])
def test_bad_row_error_names_file_line_and_field(tmp_path, row, field):
    path = _write_jsonl(tmp_path / "bad.jsonl", [_toy(0), _toy(1), row])
    with pytest.raises(DataError) as e:
        load_records(path)
    msg = str(e.value)
    assert "bad.jsonl line 3" in msg and field in msg, msg


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(_write_jsonl(tmp_path / "x.jsonl", [_toy(0), "{not json"]))
    with pytest.raises(DataError, match="x.jsonl line 2"):
        load_records(_write_jsonl(tmp_path / "x.jsonl", [_toy(0), "{not json"]))
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="expected .jsonl, .json or .parquet"):
        load_records(tmp_path / "x.csv")
    (tmp_path / "obj.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match="expected a JSON list"):
        load_records(tmp_path / "obj.json")
    (tmp_path / "rows.json").write_text(json.dumps([_toy(0), {"domain": "toy"}]))
    with pytest.raises(DataError, match=r"rows.json row 1: field 'prompt'"):
        load_records(tmp_path / "rows.json")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet: not a readable parquet"):
        load_records(tmp_path / "junk.parquet")


# ---------------------------------------------------------------- tokenisation and dropping

def test_chat_template_tokenisation_matches_hand_rendering(tokenizer):
    recs = [_toy(3), {"domain": "toy", "answer": "4", "prompt": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "next 3"}]}]
    ds = PromptDataset([(recs, 1.0)], tokenizer, seed=0)
    got = [p.prompt_ids for p in ds.all_prompts()]
    assert got[0] == _expected_chat_ids("copy 3")
    assert got[1] == _expected_chat_ids("next 3", system_text="be brief")


def test_no_chat_template_encodes_raw_text(tokenizer):
    v = _vocab()
    ds = PromptDataset([([_toy(5)], 1.0)], tokenizer, chat_template=False)
    assert ds.all_prompts()[0].prompt_ids == [v[c] for c in "copy 5"]
    msgs = {"domain": "toy", "answer": "1", "prompt": [{"role": "user", "content": "copy 1"}]}
    with pytest.raises(DataError, match="chat_template=True"):
        PromptDataset([([msgs], 1.0)], tokenizer, chat_template=False)


def test_tokenizer_without_chat_template_is_a_clear_error():
    from transformers import AutoTokenizer
    bare = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        PromptDataset([([_toy(1)], 1.0)], bare)
    assert len(PromptDataset([([_toy(1)], 1.0)], bare, chat_template=False)) == 1


def test_overlong_prompts_dropped_and_counted(tokenizer):
    base = len(_expected_chat_ids(""))  # template overhead in tokens
    assert base == 19  # <|im_start|> "user\n" <|im_end|> "\n" <|im_start|> "assistant\n"
    short = [_toy(i, prompt="ab") for i in range(4)]           # base + 2 tokens
    long_ = [_toy(i, prompt="abcdefgh") for i in range(3)]     # base + 8 tokens
    ds = PromptDataset([(short + long_, 1.0), (long_, 0.0)], tokenizer,
                       max_prompt_tokens=base + 5, seed=0)
    assert ds.sizes == [4, 0]
    assert ds.num_dropped == 6
    assert list(ds.num_dropped_by_source.values()) == [3, 3]
    assert all(len(p.prompt_ids) <= base + 5 for p in ds.all_prompts())
    assert PromptDataset([(short + long_, 1.0)], tokenizer, max_prompt_tokens=base + 8).sizes == [7]
    with pytest.raises(DataError, match="no prompts left"):
        PromptDataset([(short, 1.0), (long_, 2.0)], tokenizer, max_prompt_tokens=base + 5)


def test_bad_dataset_arguments(tokenizer):
    with pytest.raises(DataError, match="mixing weight"):
        PromptDataset([([_toy(0)], -1.0)], tokenizer)
    with pytest.raises(DataError, match="at least one positive"):
        PromptDataset([([_toy(0)], 0.0)], tokenizer)
    with pytest.raises(DataError, match="max_prompt_tokens"):
        PromptDataset([([_toy(0)], 1.0)], tokenizer, max_prompt_tokens=0)
    with pytest.raises(DataError, match=r"source 0 \(in-memory records\) row 1: field 'prompt'"):
        PromptDataset([([_toy(0), {"domain": "toy", "answer": "1"}], 1.0)], tokenizer)


# ---------------------------------------------------------------- mixing, order, resumption

@pytest.fixture(scope="module")
def mixed(tokenizer):
    a = [_toy(i, prompt=f"copy {i % 10}", src="a") for i in range(30)]
    b = [_toy(i, prompt=f"next {i % 10}", src="b") for i in range(7)]
    return PromptDataset([(a, 3.0), (b, 1.0)], tokenizer, seed=123)


def test_mixing_follows_weights(mixed):
    batch = mixed.iterator().next_batch(4000)
    frac_a = np.mean([p.source == 0 for p in batch])
    # binomial(4000, 0.75): std 0.0068; 0.03 is > 4 sigma
    assert abs(frac_a - 0.75) < 0.03, frac_a
    assert all(p.record["src"] == "ab"[p.source] for p in batch)


def test_each_epoch_visits_every_record_once(mixed):
    batch = mixed.iterator().next_batch(400)
    b_indices = [p.index for p in batch if p.source == 1]
    assert len(b_indices) >= 21
    for e in range(3):
        assert sorted(b_indices[7 * e: 7 * e + 7]) == list(range(7))
    assert b_indices[:7] != b_indices[7:14]  # reshuffled per epoch


def test_order_deterministic_by_seed_and_batching(mixed, tokenizer):
    one = [(p.source, p.index) for p in mixed.iterator().next_batch(24)]
    it = mixed.iterator()
    split = [(p.source, p.index) for n in (4, 4, 16) for p in it.next_batch(n)]
    assert one == split
    other = PromptDataset([(s.records, s.weight) for s in mixed.sources], tokenizer, seed=124)
    assert [(p.source, p.index) for p in other.iterator().next_batch(24)] != one


def test_state_dict_resumes_exactly(mixed):
    it = mixed.iterator()
    it.next_batch(45)  # past the end of source b's first epoch
    state = json.loads(json.dumps(it.state_dict()))
    expected = [(p.source, p.index) for p in it.next_batch(30)]
    resumed = mixed.iterator()
    resumed.load_state_dict(state)
    assert [(p.source, p.index) for p in resumed.next_batch(30)] == expected
    assert state["num_drawn"] == 45


def test_state_dict_mismatch_is_a_clear_error(mixed, tokenizer):
    state = mixed.iterator().state_dict()
    smaller = PromptDataset([(mixed.sources[0].records[:10], 3.0),
                             (mixed.sources[1].records, 1.0)], tokenizer, seed=123)
    with pytest.raises(DataError, match="had 30 prompts when saved, now has 10"):
        smaller.iterator().load_state_dict(state)
    reseeded = PromptDataset([(s.records, s.weight) for s in mixed.sources], tokenizer, seed=5)
    with pytest.raises(DataError, match="seed 123"):
        reseeded.iterator().load_state_dict(state)
    with pytest.raises(DataError, match="version"):
        mixed.iterator().load_state_dict({"num_drawn": 3})


def test_dataset_from_files_with_weights(tmp_path, tokenizer):
    pa = _write_jsonl(tmp_path / "a.jsonl", [_toy(i) for i in range(5)])
    pb = _write_jsonl(tmp_path / "b.jsonl", [_toy(i, prompt="next 1") for i in range(5)])
    ds = PromptDataset([(pa, 1.0), (pb, 0.0)], tokenizer, seed=0)
    assert {p.source for p in ds.iterator().next_batch(50)} == {0}
    assert [s.name for s in ds.sources] == [pa, pb]
    firsts = ds.all_prompts(max_per_source=2)
    assert [(p.source, p.index) for p in firsts] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(ds.all_prompts()) == 10
