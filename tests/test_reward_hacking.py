"""Reward hacking: one test per way a policy was found to be overpaid (issue 12), and one per
escape class the code sandbox stops. Each asserts the attack earns nothing (or the honest
answer is not hurt); see rewards/README.md for the rules they pin down."""
import itertools
import json
import os
import random
import re
import threading
import time

import pytest

import rewards
from rewards import extract, ifeval_checks as ic, logic_grader, logic_strict
from rewards.pool import RewardPool
from rewards.sandbox import SandboxLimits, run_tests

TIGHT = SandboxLimits(per_test_timeout_s=1.5, cpu_time_s=2, memory_bytes=256 << 20,
                      max_processes=16, max_output_bytes=64 << 10, tmpfs_bytes=8 << 20,
                      total_timeout_s=3.0)
BIG = 200_000  # characters: the size of the adversarial responses
GENEROUS_S = 3.0  # bound for 200 KB scans (they take milliseconds; quadratic ones took minutes)


def _code(tests, program, **extra):
    return rewards.score({"domain": "code", "tests": tests, **extra},
                         f"</think>\n```python\n{program}\n```")


@pytest.fixture(scope="module")
def pool():
    with RewardPool(2) as p:
        yield p


# ---- code: exact integers ------------------------------------------------------------------

def test_code_integer_outputs_are_compared_exactly():
    big = 123456789012345678 * 987654321
    stdin = {"inputs": [""], "outputs": [f"{big}\n"]}
    assert _code(stdin, f"print({big})") == 1.0
    assert _code(stdin, f"print({big + 1000})") == 0.0  # off by 1000 on a 1e26 result
    assert _code(stdin, "print(123456789012345678.0 * 987654321)") == 0.0  # float-rounded
    off_by_one = {"inputs": ["", ""], "outputs": ["1000000\n", "123456789"]}
    assert _code(off_by_one, "print(1000001 if input.__name__ else 0)") == 0.0
    call = {"fn_name": "f", "inputs": [[]], "outputs": [big]}
    assert _code(call, f"def f():\n    return {big}") == 1.0
    assert _code(call, f"def f():\n    return {float(big)}") == 0.0
    # the tolerance remains where the expected token is a float (documented)
    floats = {"inputs": [""], "outputs": ["0.333333333\n"]}
    assert _code(floats, "print(1/3)") == 1.0
    assert _code(floats, "print(0.3334)") == 0.0


# ---- IFEval --------------------------------------------------------------------------------

KWARG_VALUES = {"keywords": [["cat"]], "keyword": ["cat"], "frequency": [1, 3],
                "relation": list(ic.RELATIONS), "forbidden_words": [["cat"]], "letter": ["a"],
                "let_frequency": [1, 3], "let_relation": list(ic.RELATIONS), "language": ["en"],
                "num_sentences": [1, 3], "num_paragraphs": [1, 2], "num_words": [1, 50],
                "nth_paragraph": [1], "first_word": ["hello"], "num_placeholders": [1],
                "postscript_marker": ["P.S."], "num_bullets": [1], "num_highlights": [1],
                "section_spliter": ["SECTION"], "num_sections": [1],
                "prompt_to_repeat": ["Say hi."], "end_phrase": ["Bye."],
                "capital_frequency": [1, 3], "capital_relation": list(ic.RELATIONS)}


def _all_instruction_kwargs():
    for iid, names in ic.INSTRUCTION_KWARGS.items():
        for values in itertools.product(*(KWARG_VALUES[n] for n in names)):
            yield iid, dict(zip(names, values))


def test_empty_or_whitespace_answers_follow_no_instruction():
    cases = list(_all_instruction_kwargs())
    assert {iid for iid, _ in cases} == ic.KNOWN_INSTRUCTION_IDS
    ids, kwargs = [c[0] for c in cases], [c[1] for c in cases]
    for empty in ("", " ", "\n\n\t ", "<think>only thoughts</think>"):
        record = {"domain": "ifeval", "instruction_id_list": ids, "kwargs": kwargs}
        assert rewards.score(record, "<think>plan</think>" + empty) == 0.0, repr(empty)


def test_instruction_arguments_are_stripped_as_the_reference_does():
    text = "keyword, Keyword, KEYWORD\nSECTION 1 a\nSECTION 2 b\nP.S. bye\nAny more questions?"
    assert ic.keyword_frequency(text, keyword="  keyword ", frequency=3, relation="at least")
    assert ic.multiple_sections(text, section_spliter=" SECTION ", num_sections=2)
    assert ic.postscript(text, postscript_marker=" P.S. ")
    assert ic.end_checker(text, end_phrase="\n  Any more questions?\n  ")
    assert ic.letter_frequency(text, letter=" k", let_frequency=3, let_relation="at least")


def test_capital_words_are_counted_on_treebank_tokens():
    # nltk.word_tokenize (the reference): "DON'T" -> DO N'T (2), "NASA's" -> NASA 's (1),
    # "U.S.A." one token, hyphenated words one token
    count = lambda t: sum(1 for w in ic.word_tokens(t) if w.isupper())
    assert count("DON'T stop") == 2
    assert count("NASA's rover") == 1
    assert count("The U.S.A. is big.") == 1
    assert count("WELL-KNOWN facts") == 1
    assert ic.capital_word_frequency("DON'T", capital_frequency=2, capital_relation="at least")


def test_ifeval_rules_reject_records_the_checks_cannot_read():
    good = {"domain": "ifeval", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    assert rewards.score(good, "</think>fine") == 1.0
    with pytest.raises(rewards.RecordError, match=r"kwargs\[0\].*num_words"):
        rewards.score({**good, "instruction_id_list": ["length_constraints:number_words"],
                       "kwargs": [{"num_words": 5}]}, "</think>x")  # relation missing
    with pytest.raises(rewards.RecordError, match=r"kwargs\[0\]"):
        rewards.score({**good, "kwargs": [{"bogus": 1}]}, "</think>x")


# ---- time: every scanner linear, what is scanned capped ------------------------------------

ADVERSARIAL = {
    "math": ({"domain": "math", "answer": "5"}, "</think>" + "\\boxed{" * (BIG // 7)),
    "math_think": ({"domain": "math", "answer": "5"}, "<think>" * (BIG // 7) + "</think>x"),
    "logic": (None, "</think>" + "<answer>" * (BIG // 8)),
    "ifeval_title": ({"domain": "ifeval", "instruction_id_list": ["detectable_format:title"],
                      "kwargs": [{}]}, "</think>" + "<<" * (BIG // 2)),
    "ifeval_bullets": ({"domain": "ifeval", "kwargs": [{"num_bullets": 1}],
                        "instruction_id_list": ["detectable_format:number_bullet_lists"]},
                       "</think>x" + " \n" * (BIG // 2)),
    "stem": ({"domain": "stem", "answer": "B"}, "</think>" + "answer: " * (BIG // 8)),
    "code": ({"domain": "code", "tests": {"inputs": [""], "outputs": ["1"]}},
             "</think>" + "```python\n" * (BIG // 10)),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_200kb_adversarial_responses_are_scored_at_once(name, logic_records):
    record, response = ADVERSARIAL[name]
    record = record or logic_records["sudoku"]
    t0 = time.monotonic()
    assert rewards.score(record, response) == 0.0
    assert time.monotonic() - t0 < GENEROUS_S


def _ref_boxed(text):  # the earlier quadratic implementation, kept as the reference
    for start in reversed([m.start() for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]):
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
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if text[j] == "}" and depth == 0:
                return text[i + 1:j]
    return None


def test_linear_scanners_match_the_regexes_they_replace():
    rng = random.Random(0)
    atoms = ["<answer>", "</answer>", "<think>", "</think>", "\\boxed", "\\fbox", "{", "}",
             " ", "a", "5", "$", "*", "**", "-", "\n", "\t", "<<", ">>", "[", "]", "<", ">"]
    for _ in range(4000):
        s = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 14)))
        tags = re.findall(r"<answer>(.*?)</answer>", s, flags=re.DOTALL)
        assert extract.last_tagged(s) == (tags[-1].strip() if tags else None), s
        no_think = re.sub(r"<think>.*?</think>", "", s, flags=re.DOTALL)
        cut = no_think.rfind("</think>")
        assert extract.strip_think(s) == (no_think[cut + 8:] if cut >= 0 else no_think), s
        assert extract.last_boxed(s) == _ref_boxed(s), s
        stars = re.findall(r"^\s*\*[^\*].*$", s, flags=re.MULTILINE)
        assert ic.count_line_items(s, "*") == len(stars), s
        assert ic.count_line_items(s, "-") == len(re.findall(r"^\s*-.*$", s, flags=re.M)), s
        assert ic.count_placeholders(s) == len(re.findall(r"\[.*?\]", s)), s
        assert ic.titles(s) == re.findall(r"<<[^\n]+>>", s), s


def test_over_long_answers_are_not_read():
    ifeval = {"domain": "ifeval", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    assert rewards.score(ifeval, "</think>" + "ok " * 6000) == 0.0  # 18 KB > the 16 KB cap
    assert rewards.score({"domain": "math", "answer": "1"},
                         "</think>\\boxed{" + "+".join(["1"] * 300) + "-299}") == 0.0


# ---- sandboxes cannot starve each other ----------------------------------------------------

THREADED = ("import threading, time\nts = [threading.Thread(target=time.sleep, args=(0.6,))"
            " for _ in range(6)]\n[t.start() for t in ts]\n[t.join() for t in ts]\nprint('ok')")
HOG = ("import os, time\nfor _ in range(40):\n    try:\n        if os.fork() == 0:\n"
       "            time.sleep(3)\n            os._exit(0)\n    except OSError:\n        break\n"
       "time.sleep(2)\nprint('hog')")
FORKER = ("import os, time\ntime.sleep(0.4)\npids = [os.fork() for _ in range(4)]\n"
          "if 0 in pids:\n    os._exit(0)\n[os.waitpid(p, 0) for p in pids]\nprint('ok')")
STARVE = SandboxLimits(per_test_timeout_s=3.0, total_timeout_s=4.0)


def test_concurrent_threaded_programs_all_get_their_processes():
    out = {}

    def run(k):
        out[k] = run_tests(THREADED, [""], limits=STARVE)[0]["out"].strip()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [out[k] for k in range(8)] == ["ok"] * 8  # 8 x 7 threads > 32 for one shared uid


def test_one_responses_processes_cannot_zero_another_in_the_pool(pool):
    tests = {"inputs": [""], "outputs": ["ok"]}
    recs = [{"domain": "code", "tests": {"inputs": [""], "outputs": ["hog"]},
             "per_test_timeout_s": 3.0}, {"domain": "code", "tests": tests,
                                          "per_test_timeout_s": 3.0}]
    resp = [f"</think>```python\n{HOG}\n```", f"</think>```python\n{FORKER}\n```"]
    r = pool.score_batch(recs, resp)  # two workers: both sandboxes run at once
    assert r == [1.0, 1.0]


# ---- logic: strict scorers -----------------------------------------------------------------

@pytest.fixture(scope="module")
def logic_records():
    tasks = ("sudoku", "boxnet", "graph_color", "countdown", "gsm_symbolic", "knights_knaves",
             "simple_integration", "fraction_simplification", "coin_flip", "letter_jumble")
    return {r["task"]: r for r in rewards.logic_records(tasks, size=1, seed=5)}


def _ans(text):
    return f"</think><answer>{text}</answer>"


def test_logic_non_answers_earn_nothing(logic_records):
    for task in ("boxnet", "graph_color", "countdown", "sudoku"):
        for junk in ("", "[]", "{}", "0", '{"0": 1}', "I don't know"):
            assert rewards.score(logic_records[task], _ans(junk)) == 0.0, (task, junk)


def test_logic_padded_corrupted_and_hedged_oracles_earn_nothing(logic_records):
    sudoku = logic_records["sudoku"]
    oracle = sudoku["entry"]["answer"]
    assert rewards.score(sudoku, _ans(oracle)) == 1.0
    corrupted = oracle.replace(oracle[0], str(int(oracle[0]) % 9 + 1), 1)
    assert rewards.score(sudoku, _ans(corrupted)) == 0.0  # reasoning-gym: ~0.8
    assert rewards.score(sudoku, _ans(oracle + "\n" + oracle)) == 0.0  # reasoning-gym: ~0.4
    for task in ("gsm_symbolic", "knights_knaves", "fraction_simplification", "letter_jumble"):
        rec = logic_records[task]
        oracle = rec["entry"]["answer"]
        assert rewards.score(rec, _ans(oracle)) == 1.0, task
        assert rewards.score(rec, _ans(f"{oracle} or maybe {oracle} 12")) == 0.0, task
    coin = logic_records["coin_flip"]
    assert rewards.score(coin, _ans(coin["entry"]["answer"])) == 1.0


def test_propositional_logic_is_excluded_with_a_reason():
    assert "premise" in logic_grader.EXCLUDED_TASKS["propositional_logic"]
    with pytest.raises(ValueError, match="propositional_logic"):
        rewards.logic_records(("propositional_logic",), size=1)


def test_answers_are_never_evaluated_as_python(logic_records, tmp_path):
    marker = tmp_path / "pwned"
    attack = f"__import__('pathlib').Path('{marker}').touch()"
    for task in ("countdown", "simple_integration"):
        assert rewards.score(logic_records[task], _ans(attack)) == 0.0
    # eval-based scorers: no call (parentheses) and no operator reaches reasoning-gym's eval
    assert not logic_strict.literal_only("[1]*10**10") and logic_strict.literal_only("[1, 'a']")
    assert not logic_strict.sympy_safe("9**9**9**9") and logic_strict.sympy_safe("x**2/2 + C")
    assert not marker.exists()
    integral = logic_records["simple_integration"]
    assert rewards.score(integral, _ans("maybe " + integral["entry"]["answer"] + " or 12")) == 0


def test_every_task_is_scored_strictly_or_excluded():
    """All 100+ reasoning-gym tasks: a known strict mode, and nothing for non-answers (the
    question restated, empty, JSON, a shrug)."""
    import reasoning_gym
    import reasoning_gym.factory

    paid = []
    for task in sorted(reasoning_gym.factory.DATASETS):
        if task in logic_grader.EXCLUDED_TASKS:
            continue
        assert logic_grader.scoring_mode(task) in ("exact", "full_credit", "own"), task
        entry = json.loads(json.dumps(reasoning_gym.create_dataset(task, size=1, seed=0)[0],
                                      default=str))
        for junk in ("", "[]", "{}", "None", "I don't know", entry["question"]):
            if logic_grader.logic_reward(task, entry, _ans(junk)) != 0.0:
                paid.append((task, junk[:40]))
    assert paid == []


# ---- math, minor ---------------------------------------------------------------------------

@pytest.mark.parametrize("gold,boxed,reward", [
    ("1,22", "1.22", 1.0), ("1,22", "1,22", 1.0), ("1,000", "1000", 1.0), ("1.22", "1,22", 0.0),
    ("2/3", "2/3.", 1.0), ("4", r"\text{the answer is 4 or maybe 5}", 0.0),
    ("4", r"4 \text{ (maybe 5)}", 0.0), ("5", r"5\text{ square units}", 1.0),
    ("3", "(" * 9 + "3" + ")" * 9, 0.0), ("3", "(" * 3 + "3" + ")" * 3, 1.0),  # MAX_NESTING = 8
])
def test_math_minor_cases(gold, boxed, reward):
    assert rewards.score({"domain": "math", "answer": gold},
                         f"</think>$\\boxed{{{boxed}}}$") == reward


def test_astronomic_literals_never_reach_math_verify(monkeypatch):
    from rewards import math_grader

    calls = []  # (an exception would be caught by the scorer's guard: record the calls)
    monkeypatch.setattr(math_grader, "equivalent", lambda gold, pred: calls.append(pred))
    for boxed in ("9^{9^{9^{9}}}", "10^{10^{10}}", "9^{999999999}", "1000000!",
                  "\\binom{100000}{50000}", "3 + 2^{2^{100}}"):
        assert rewards.score({"domain": "math", "answer": "5"}, f"</think>\\boxed{{{boxed}}}") == 0
    assert rewards.score({"domain": "math", "answer": "2^{2^{100}}"},
                         "</think>\\boxed{2^{2^{100}}}") == 1.0  # literally the gold
    assert calls == []
    monkeypatch.undo()
    assert rewards.score({"domain": "math", "answer": "256"}, "</think>\\boxed{2^{2^{3}}}") == 1.0


# ---- sandbox escape classes (each must stay stopped) ---------------------------------------

def _one(program, stdin=""):
    [res] = run_tests(program, [stdin], limits=TIGHT)
    return res


def test_escape_host_files_are_neither_readable_nor_writable(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    prog = (f"import os\nfor p in [{str(secret)!r}, '/root/.bashrc', '/work', '/etc/shadow']:\n"
            "    try:\n        print(open(p).read()[:20])\n    except OSError:\n"
            "        print('denied')\n"
            f"try:\n    open({str(tmp_path / 'w')!r}, 'w').write('x')\nexcept OSError:\n"
            "    print('denied')")
    res = _one(prog)
    assert "TOPSECRET" not in res["out"] and res["out"].split() == ["denied"] * 5
    assert not (tmp_path / "w").exists()


def test_escape_no_network():
    res = _one("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=0.5)\n"
               "    print('connected')\nexcept OSError:\n    print('blocked')")
    assert res["out"].strip() == "blocked"


def test_escape_host_processes_are_invisible_and_unkillable():
    prog = ("import os, signal\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
            "for pid in (1, 2, -1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError:\n        pass\nprint('alive')")
    res = _one(prog)
    pids = json.loads(res["out"].splitlines()[0])
    assert max(pids) < 100 and os.getpid() not in pids or len(pids) <= 3
    assert res["out"].splitlines()[-1] == "alive"


def test_escape_expected_outputs_never_reach_the_program():
    secret = f"EXPECTED-{random.Random().getrandbits(64):x}"
    prog = ("import os, sys\npaths = ['/proc/%s/%s' % (p, f) for p in (1, 2) for f in "
            "('cmdline', 'environ')]\nfor root, dirs, files in os.walk('/'):\n"
            "    if root.startswith(('/usr', '/sys', '/proc', '/dev')):\n        dirs[:] = []\n"
            "        continue\n    paths += [os.path.join(root, f) for f in files]\n"
            "hits = [sys.stdin.read()].count('EXPECTED-')\nfor p in paths:\n    try:\n"
            "        hits += b'EXPECTED-' in open(p, 'rb').read(1 << 20)\n    except OSError:\n"
            "        pass\nprint('hits', hits, len(paths))")
    tests = {"inputs": [""], "outputs": [secret]}
    assert _code(tests, prog, per_test_timeout_s=3.0) == 0.0
    res = _one(prog)
    assert res["status"] == "ok" and res["out"].startswith("hits 0 ")


def test_escape_resource_bombs_are_contained():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    assert _one(bomb)["status"] in ("timeout", "error")
    assert _one("x = bytearray(10 ** 10)\nprint('big')")["status"] == "error"
    assert _one("while True:\n    print('x' * 10000)")["status"] == "output_limit"
    disk = _one("open('f', 'w').write('x' * (20 << 20))\nprint('done')")  # > FSIZE and /tmp
    assert disk["status"] in ("error", "timeout") and "done" not in disk["out"]
    fds = _one("import os\nn = 0\ntry:\n    while True:\n        os.open('/dev/null', 0)\n"
               "        n += 1\nexcept OSError:\n    print(n)")
    assert int(fds["out"]) < TIGHT.max_open_files


def test_escape_daemons_do_not_outlive_their_test():
    prog = ("import os, sys, time\nif input() == 'spawn':\n    if os.fork() == 0:\n"
            "        os.setsid()\n        if os.fork() == 0:\n            time.sleep(30)\n"
            "        os._exit(0)\n    print('spawned')\nelse:\n    time.sleep(0.1)\n"
            "    print(len([p for p in os.listdir('/proc') if p.isdigit()]))")
    res = run_tests(prog, ["spawn\n", "count\n"], limits=TIGHT)
    assert res[0]["out"].strip() == "spawned"
    assert res[1]["out"].strip() == "3"  # bwrap's init, the runner and this test: no daemon


def test_puzzle24_pays_only_for_the_puzzles_own_numbers():
    """reasoning-gym's puzzle24 scorer checks only that the expression equals 24."""
    import reasoning_gym

    entry = json.loads(json.dumps(reasoning_gym.create_dataset("puzzle24", size=1, seed=0)[0]))
    record = {"domain": "logic", "task": "puzzle24", "entry": entry, "prompt": entry["question"]}
    assert entry["metadata"]["numbers"] == [1, 3, 5, 9]
    assert rewards.score(record, _ans(entry["answer"])) == 1.0
    assert rewards.score(record, _ans("(9 - 5) * (1 + 3) + 3 * 5 - 7")) == 0.0  # other numbers
    for hack in ("4*6", "24", "1*3*5 + 9 + 0", "1*3*5 + 9*1", "1*3*5 + 9.0",
                 "(1*3*5 + 9)**1", "__import__('os').getpid()"):
        assert rewards.score(record, _ans(hack)) == 0.0, hack
    assert rewards.score(record, _ans("(9 + 3*5) * 1")) == 1.0   # any order, any form
    assert logic_grader.scoring_mode("puzzle24") == "own"
