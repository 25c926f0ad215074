"""Pure text helpers: the graded region of a response and the answer inside it.

- `answer_region`: the text after the last `</think>` (R1-style reasoning); without a closing
  tag the `think_mode` setting decides ("require": unanswered -> None; "optional": the whole
  response).
- `last_boxed`: the content of the last brace-matched `\\boxed{...}` (DeepScaleR's rule).
- `last_code_block`: the last fenced python block.
- `last_tagged`: the content of the last `<tag>...</tag>` pair.
"""
from __future__ import annotations

import re

THINK_CLOSE = "</think>"
THINK_MODES = ("require", "optional")

_FENCE_RE = re.compile(r"```[ \t]*(python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)


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


def strip_think(response: str) -> str:
    """Remove every `<think>...</think>` span and a dangling leading reasoning (up to `</think>`)."""
    text = re.sub(r"<think>.*?</think>", "", response, flags=re.DOTALL)
    cut = text.rfind(THINK_CLOSE)
    return text[cut + len(THINK_CLOSE):] if cut >= 0 else text


def last_boxed(text: str) -> str | None:
    """Content of the last brace-matched `\\boxed{...}` (or `\\fbox{...}`) in `text`; None if none.

    Braces are matched by depth counting, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`; an
    unclosed box gives None. `\\boxed 5` (no braces) gives `5`.
    """
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    for start in reversed(starts):
        i = text.index("\\", start) + (6 if text.startswith("\\boxed", start) else 5)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] != "{":
            m = re.match(r"[^\s$]+", text[i:])
            if m and text[i - 1] == " ":
                return m.group(0)
            continue
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j]
        # unbalanced: try an earlier box
    return None


def last_code_block(text: str) -> str | None:
    """Body of the last fenced ```python (or ```py / ```python3) block; None if none."""
    blocks = _FENCE_RE.findall(text)
    return blocks[-1][1] if blocks else None


def last_tagged(text: str, tag: str = "answer") -> str | None:
    """Stripped content of the last `<tag>...</tag>` pair in `text`; None if none."""
    matches = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return matches[-1].strip() if matches else None
