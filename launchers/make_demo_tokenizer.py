"""Builds the tiny character-level tokenizer shipped for the CPU demo.

    python launchers/make_demo_tokenizer.py [--out prorl_jax/assets/demo_tokenizer]

Vocabulary (ids fixed, 61 entries; the demo model's vocab_size may be larger):
    0..5   special: <|endoftext|> (pad and EOS), <|im_start|>, <|im_end|>, <think>, </think>, <unk>
    6..    one token per character: digits, lowercase letters, space, newline, punctuation.
Any other character encodes to <unk>. The chat template is ChatML-like:
    <|im_start|>{role}\\n{content}<|im_end|>\\n ... then, for generation, <|im_start|>assistant\\n
The directory it writes loads offline with `transformers.AutoTokenizer.from_pretrained(dir)`.
"""
from __future__ import annotations

import argparse
import json
import os
import string

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<unk>")
PUNCTUATION = ".,:;?!+-*/=()'\"<>"
CHARACTERS = tuple(string.digits + string.ascii_lowercase + " \n" + PUNCTUATION)
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"

# Jinja, rendered by transformers' apply_chat_template. Messages: [{"role", "content"}].
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "prorl_jax", "assets", "demo_tokenizer")


def build_vocab() -> dict[str, int]:
    """Token -> id: special tokens first, then one id per character (in CHARACTERS order)."""
    tokens = list(SPECIAL_TOKENS) + list(CHARACTERS)
    if len(set(tokens)) != len(tokens):
        raise ValueError("demo tokenizer vocabulary has duplicate entries")
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer():
    """A `tokenizers.Tokenizer`: every character is a word of a WordLevel model; decoding fuses."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=build_vocab(), unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json, written by hand (not by save_pretrained) so that it loads in
    transformers 4.x and 5.x alike: the generic fast-tokenizer class plus the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:5]),
        "model_max_length": 4096,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def save_demo_tokenizer(out_dir: str) -> str:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json to `out_dir`
    (removing a stale chat_template.jinja); returns the directory."""
    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer().save(os.path.join(out_dir, "tokenizer.json"))
    config = tokenizer_config()
    special_map = {k: config[k] for k in ("eos_token", "pad_token", "unk_token",
                                          "additional_special_tokens")}
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    stale = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(stale):
        os.remove(stale)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    out = save_demo_tokenizer(os.path.normpath(args.out))
    print(f"wrote the demo tokenizer ({len(SPECIAL_TOKENS) + len(CHARACTERS)} tokens) to {out}")


if __name__ == "__main__":
    main()
