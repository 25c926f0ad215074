"""The CPU demo's pieces: the shipped character-level tokenizer, the toy task generator and its
reward (launchers/make_demo_tokenizer.py, prorl_jax/toy_task.py, rewards/toy.py)."""
import json
import os
import re

import pytest
from fixtures.launcher import load_launcher

from prorl_jax import toy_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "prorl_jax", "assets", "demo_tokenizer")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]




@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


# ---------------------------------------------------------------- demo tokenizer

def test_shipped_tokenizer_is_what_the_script_builds(tmp_path):
    """Same configs, vocabulary, special tokens and encodings (not bytes: tokenizer.json's
    layout may differ between `tokenizers` versions)."""
    load_launcher("make_demo_tokenizer").main(["--out", str(tmp_path)])
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        with open(tmp_path / name) as a, open(os.path.join(TOKENIZER_DIR, name)) as b:
            assert json.load(a) == json.load(b), name
    from tokenizers import Tokenizer
    built = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    shipped = Tokenizer.from_file(os.path.join(TOKENIZER_DIR, "tokenizer.json"))
    assert built.get_vocab(with_added_tokens=True) == shipped.get_vocab(with_added_tokens=True)
    text = "<|im_start|>user\ncopy 7, then 3+4?<|im_end|>\n<think>x</think>Q"
    assert built.encode(text).ids == shipped.encode(text).ids


def test_tokenizer_vocabulary_and_special_ids(tokenizer):
    assert len(tokenizer) <= 128
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids(SPECIALS) == [0, 1, 2, 3, 4]
    vocab = tokenizer.get_vocab()
    for ch in "0123456789abcdefghijklmnopqrstuvwxyz +=.,?":
        assert ch in vocab, ch
    assert set(SPECIALS) <= set(tokenizer.all_special_tokens)


@pytest.mark.parametrize("text", ["copy 7", "3+9 mod 10", "the answer is: 42.\n(yes!)",
                                  "<think>hm</think>7<|im_end|>"])
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    special = re.compile(r"<\|[a-z_]+\|>|</?think>")
    plain = special.sub("", text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == plain
    assert len(ids) == len(plain) + len(special.findall(text))  # one id per char / special


def test_unknown_characters_map_to_unk(tokenizer):
    ids = tokenizer("Hi", add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.unk_token_id, tokenizer.convert_tokens_to_ids("i")]


def test_chat_template_is_short_chatml(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "copy 7"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\ncopy 7<|im_end|>\n<|im_start|>assistant\n"
    with open(os.path.join(TOKENIZER_DIR, "tokenizer_config.json")) as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"


# ---------------------------------------------------------------- toy task

@pytest.mark.parametrize("task, check", [
    ("copy", lambda p, a: p == f"copy {a}"),
    ("successor", lambda p, a: int(a) == (int(p.split()[1]) + 1) % 10),
    ("add_mod10", lambda p, a: int(a) == sum(map(int, p.split()[0].split("+"))) % 10),
    ("add", lambda p, a: int(a) == sum(map(int, p.split("+")))),
])
def test_toy_answers_are_correct(task, check):
    recs = toy_task.make_records(task, 200, seed=1)
    assert len(recs) == 200
    for r in recs:
        assert r["domain"] == "toy" and r["task"] == task
        assert check(r["prompt"], r["answer"]), r
    assert len({r["prompt"] for r in recs}) >= 10


def test_toy_records_deterministic_and_mixed():
    a = toy_task.make_records("copy+successor", 50, seed=3)
    assert a == toy_task.make_records("copy+successor", 50, seed=3)
    assert a != toy_task.make_records("copy+successor", 50, seed=4)
    assert {r["task"] for r in a} == {"copy", "successor"}
    assert len({r["id"] for r in a}) == 50


def test_toy_task_errors():
    with pytest.raises(ValueError, match="'mul' unknown"):
        toy_task.make_records("copy+mul", 3, seed=0)
    with pytest.raises(ValueError, match="num"):
        toy_task.make_records("copy", -1, seed=0)


def test_toy_prompts_use_only_tokenizer_characters(tokenizer):
    recs = toy_task.make_records("copy+successor+add_mod10+add", 300, seed=0)
    unk = tokenizer.unk_token_id
    for r in recs:
        assert unk not in tokenizer(r["prompt"] + r["answer"], add_special_tokens=False)["input_ids"]


def test_toy_task_cli_writes_loadable_jsonl(tmp_path):
    from prorl_jax.data import load_records
    out = tmp_path / "toy.jsonl"
    toy_task.main(["--task", "successor", "--num", "12", "--seed", "2", "--out", str(out)])
    assert load_records(out) == toy_task.make_records("successor", 12, seed=2)


# ---------------------------------------------------------------- reward

def test_toy_reward_values():
    from rewards.toy import score_toy
    assert score_toy("7", "7") == 1.0
    assert score_toy("7", " 7\n") == 1.0
    assert score_toy("42", "42") == 1.0
    assert score_toy("7", "7abc") == 0.5 * 1 / 4
    assert score_toy("7", "7a") == 0.25
    assert score_toy("4", "42") == 0.25
    assert score_toy("42", "42 x") == 0.5 * 2 / 4
    assert score_toy("42", "4") == 0.0
    assert score_toy("7", "x7") == 0.0
    assert score_toy("7", "") == 0.0
    with pytest.raises(ValueError, match="'answer'"):
        score_toy("", "7")


def test_toy_domain_registered():
    import rewards.toy
    from rewards.registry import get_domain
    domain = get_domain({"domain": "toy", "prompt": "copy 1", "answer": "1"})
    assert domain.fn is rewards.toy.toy_reward
    assert domain.required_fields == ("answer",)
    assert domain.fn({"answer": "1"}, "1") == 1.0
    with pytest.raises(ValueError, match="'answer'"):
        get_domain({"domain": "toy", "prompt": "copy 1"})
