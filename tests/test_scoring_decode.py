"""Responses are decoded for the verifiers with `</think>` kept (prorl_jax/build.RewardScorer):
a tokenizer whose <think>/</think> are added special tokens scores the same as one where they
are plain added tokens, both built in DeepSeek-R1-Distill-Qwen's layout (tests/fixtures)."""
import types

import numpy as np
import pytest
from fixtures.r1_tokenizer import EOS, save_r1_tokenizer

from prorl_jax import build

RESPONSE = "Two and two make four.</think>The answer is $\\boxed{4}$."
RECORD = {"domain": "math", "prompt": "What is 2+2?", "answer": "4"}


def _cfg(path):
    return types.SimpleNamespace(
        tokenizer_path=path, model=types.SimpleNamespace(path=""),
        reward=types.SimpleNamespace(think_mode="require", timeout_s=10.0, num_workers=1))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    out = {}
    for special in (False, True):
        path = save_r1_tokenizer(str(tmp_path_factory.mktemp(f"r1_special_{special}")), special)
        out[special] = (_cfg(path), build.load_tokenizer(_cfg(path)))
    return out


@pytest.fixture(scope="module")
def scorers(tokenizers):
    made = {k: build.RewardScorer(cfg, tok) for k, (cfg, tok) in tokenizers.items()}
    yield made
    for s in made.values():
        s.close()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_tokenizers_have_the_r1_distill_layout(tokenizers):
    for special, (_, tok) in tokenizers.items():
        assert len(tok) == 151665
        assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [151648, 151649]
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (151646, 151643, 151643)
        assert tok.added_tokens_decoder[151649].special is special
        assert tok.added_tokens_decoder[151643].special is True
        prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
        assert prompt == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>\n"
    # the special layout is the one whose plain skip_special_tokens decoding loses </think>
    tok = tokenizers[True][1]
    assert "</think>" not in tok.decode(_ids(tok, RESPONSE), skip_special_tokens=True)


def test_decoding_keeps_think_and_drops_eos_in_both_layouts(scorers, tokenizers):
    texts = {}
    for special, scorer in scorers.items():
        tok = tokenizers[special][1]
        ids = _ids(tok, "<think>" + RESPONSE)
        assert ids.count(151649) == 1 and ids[-1] == 151643
        texts[special] = scorer.decode([ids, ids[:-1]])
    assert texts[False] == texts[True] == ["<think>" + RESPONSE] * 2
    assert EOS not in texts[True][0]


def test_both_layouts_score_the_same(scorers, tokenizers):
    answers = [RESPONSE, "No closing tag, \\boxed{4}.", "Wrong.</think>\\boxed{5}"]
    scores = {}
    for special, scorer in scorers.items():
        tok = tokenizers[special][1]
        scores[special] = scorer([RECORD] * 3, [_ids(tok, a) for a in answers])
    np.testing.assert_array_equal(scores[False], scores[True])
    np.testing.assert_array_equal(scores[True], [1.0, 0.0, 0.0])


def test_demo_tokenizer_keeps_its_special_think_tags():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(build.DEMO_TOKENIZER_DIR)
    drop = build.scoring_drop_ids(tok)
    assert tok.convert_tokens_to_ids("</think>") not in drop
    assert {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} <= drop
