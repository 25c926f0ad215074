"""Pure text helpers: the graded region of a response and the answer inside it.

- `answer_region`: the text after the last `</think>` (R1-style reasoning); without a closing
  tag the `think_mode` setting decides ("require": unanswered -> None; "optional": the whole
  response).
- `last_boxed`: the content of the last brace-matched `\\boxed{...}` (DeepScaleR's rule).
- `last_code_block`: the last fenced python block.
- `last_tagged`: the content of the last `<tag>...</tag>` pair.
- `strip_think`: the text with every `<think>...</think>` span removed.

Every scanner here is linear in the length of its input (one pass, or `str.find` calls that never
revisit text), so a 200 KB response of unclosed `\\boxed{`, `<answer>` or `<think>` costs
milliseconds, not minutes. The extractors of an answer (`last_boxed`, `last_code_block`,
`last_tagged`) look only at the last SCAN_LIMIT_CHARS characters of their input: an answer that
starts before that window is not seen (it scores 0).
"""
from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_MODES = ("require", "optional")
SCAN_LIMIT_CHARS = 64 * 1024  # extractors read only this many trailing characters

_FENCE_RE = re.compile(r"```[ \t]*(python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_BRACE_RE = re.compile(r"[{}]")
_BARE_ARG_RE = re.compile(r"[^\s$]+")


def answer_region(response: str, think_mode: str = "require") -> str | None:
    """Text after the last `</think>`; None when unanswered (no tag and think_mode="require")."""
    if think_mode not in THINK_MODES:
        raise ValueError(f"think_mode: expected one of {THINK_MODES}, got {think_mode!r}")
    if not isinstance(response, str):
        raise TypeError(f"response: expected str, got {type(response).__name__}")
    cut = response.rfind(THINK_CLOSE)
    if cut >= 0:
        return response[cut + len(THINK_CLOSE):]
    return None if think_mode == "require" else response


def _tag_spans(text: str, open_tag: str, close_tag: str) -> list[tuple[int, int]]:
    """[(start of content, end of content)] of the non-overlapping `open...close` pairs, each
    open tag paired with the first close tag after it (what a lazy regex `open(.*?)close` finds),
    in one left-to-right pass."""
    spans, pos = [], 0
    while True:
        start = text.find(open_tag, pos)
        if start < 0:
            return spans
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:  # no close tag after this open one: none after any later one either
            return spans
        spans.append((start + len(open_tag), end))
        pos = end + len(close_tag)


def strip_think(response: str) -> str:
    """Remove every `<think>...</think>` span, and a dangling leading reasoning up to `</think>`."""
    pieces, pos = [], 0
    for start, end in _tag_spans(response, THINK_OPEN, THINK_CLOSE):
        pieces.append(response[pos:start - len(THINK_OPEN)])
        pos = end + len(THINK_CLOSE)
    text = "".join(pieces) + response[pos:]
    cut = text.rfind(THINK_CLOSE)
    return text[cut + len(THINK_CLOSE):] if cut >= 0 else text


def closing_braces(text: str) -> dict[int, int]:
    """{index of "{": index of its matching "}"} for every balanced pair (one pass, a stack)."""
    match, stack = {}, []
    for m in _BRACE_RE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            match[stack.pop()] = m.start()
    return match


def last_boxed(text: str) -> str | None:
    """Content of the last brace-matched `\\boxed{...}` (or `\\fbox{...}`) in `text`; None if none.

    Braces are matched by depth, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`; an unclosed box
    is skipped for an earlier one. `\\boxed 5` (no braces) gives `5`. Reads the last
    SCAN_LIMIT_CHARS characters only.
    """
    text = text[-SCAN_LIMIT_CHARS:]
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return None
    closing = closing_braces(text)
    for i in reversed(starts):
        spaced = i < len(text) and text[i] == " "
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] != "{":
            m = _BARE_ARG_RE.match(text, i)
            if m and spaced:
                return m.group(0)
            continue
        if i in closing:
            return text[i + 1:closing[i]]
    return None


def last_code_block(text: str) -> str | None:
    """Body of the last fenced ```python (or ```py / ```python3) block; None if none.

    Reads the last SCAN_LIMIT_CHARS characters. (The fence regex is linear: a failed attempt at a
    fence means no closing fence follows it, so no later attempt can succeed either.)
    """
    blocks = _FENCE_RE.findall(text[-SCAN_LIMIT_CHARS:])
    return blocks[-1][1] if blocks else None


def last_tagged(text: str, tag: str = "answer") -> str | None:
    """Stripped content of the last `<tag>...</tag>` pair in `text`; None if none.

    Reads the last SCAN_LIMIT_CHARS characters.
    """
    text = text[-SCAN_LIMIT_CHARS:]
    spans = _tag_spans(text, f"<{tag}>", f"</{tag}>")
    return text[spans[-1][0]:spans[-1][1]].strip() if spans else None
