"""Reward throughput: 4,096 math responses and 256 code responses x 10 tests (targets: < 15 s and
< 30 s on 2 cores), and the worst-case time of one adversarial 200 KB response per domain
(goal: every item under 1 s in one process; in the pool no item held past its time limit).

    python bench/rewards.py [--num-math 4096] [--num-code 256] [--workers 2]
                            [--worst-chars 200000] [--worst-domains math,stem,code,logic,ifeval]

Math: 256 prompts x 16 responses (as in a GRPO batch), golds in several forms (integers,
fractions, radicals, percentages, intervals) and responses that are right in an equivalent form,
wrong, boxless or unanswered. Code: stdin/stdout problems with 10 tests each; programs that are
right, wrong, or crash. Each phase is timed twice on the same pool: the first call (a different
draw) includes starting the workers, the second is the steady state a trainer sees. Besides wall
time it reports the CPU seconds the workers and their sandboxes used (from /proc), since wall
time on a shared machine depends on the load: cpu_s / workers is the wall time an otherwise idle
machine would need.
(Sandboxed processes are not charged to the workers, so code CPU is profiled separately.)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rewards  # noqa: E402

# (weight, gold and its accepted equivalent forms): mostly integers, as in AIME/AMC-style data.
GOLD_FORMS = [
    (0.60, lambda a, b: (str(a * b), [str(a * b), f"{a * b}.0", f"\\frac{{{2 * a * b}}}{{2}}"])),
    (0.15, lambda a, b: (f"\\frac{{{a}}}{{{b}}}", [f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}",
                                                  f"\\dfrac{{{2 * a}}}{{{2 * b}}}"])),
    (0.10, lambda a, b: (f"{a}\\sqrt{{{b}}}", [f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{b}}} \\cdot {a}"])),
    (0.05, lambda a, b: (f"{a}\\%", [f"{a}\\%", f"{a / 100}"])),
    (0.10, lambda a, b: (f"[{a}, {a + b})", [f"[{a},{a + b})"])),
]


def math_batch(n: int, rng: random.Random) -> tuple[list, list]:
    """n (record, response) pairs, 16 responses per prompt.

    Per response: 45% right (a random equivalent form), 35% wrong (one of the prompt's three
    distractors, as a policy's wrong answers cluster), 10% no box, 10% unanswered (no </think>).
    """
    records, responses = [], []
    weights = [w for w, _ in GOLD_FORMS]
    while len(records) < n:
        a, b = rng.randint(1, 99), rng.randint(2, 50)
        form = rng.choices([f for _, f in GOLD_FORMS], weights=weights)[0]
        gold, right_forms = form(a, b)
        distractors = [form(a + rng.randint(1, 20), b)[1][0] for _ in range(3)]
        for _ in range(16):
            kind = rng.random()
            if kind < 0.45:
                tail = f"so the answer is $\\boxed{{{rng.choice(right_forms)}}}$."
            elif kind < 0.8:
                tail = f"so the answer is $\\boxed{{{rng.choice(distractors)}}}$."
            elif kind < 0.9:
                tail = f"so the answer is {a}."
            else:
                tail = None
            records.append({"domain": "math", "answer": gold})
            think = "<think>" + "step " * 200
            responses.append(think if tail is None else think + "</think>" + tail)
    return records[:n], responses[:n]


CODE_PROGRAMS = {
    "right": "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(nums[1:]))",
    "wrong": "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(max(nums[1:]))",
    "crash": "import sys\nnums = sys.stdin.read().split()\nprint(nums[100])",
}


def code_batch(n: int, rng: random.Random) -> tuple[list, list]:
    """n (record, response) pairs; each problem has 10 stdin/stdout tests."""
    records, responses = [], []
    for _ in range(n):
        inputs, outputs = [], []
        for _ in range(10):
            nums = [rng.randint(-1000, 1000) for _ in range(rng.randint(1, 50))]
            inputs.append(f"{len(nums)}\n" + " ".join(map(str, nums)) + "\n")
            outputs.append(f"{sum(nums)}\n")
        kind = rng.choices(list(CODE_PROGRAMS), weights=[0.5, 0.3, 0.2])[0]
        records.append({"domain": "code", "tests": {"inputs": inputs, "outputs": outputs}})
        responses.append("<think>plan</think>\n```python\n" + CODE_PROGRAMS[kind] + "\n```")
    return records, responses


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system, including reaped descendants such as sandboxes) of `pids`."""
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / os.sysconf("SC_CLK_TCK")


def timed(pool, records, responses) -> tuple[float, float, list, dict]:
    """(wall s, CPU s of this process and the workers, scores, details) of one batch."""
    pool.score_batch(records[:1], responses[:1])  # make sure the workers exist
    pids = pool.worker_pids()
    cpu0, own0, t0 = cpu_seconds(pids), time.process_time(), time.perf_counter()
    scores, details = pool.score_batch(records, responses, return_details=True)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pids) - cpu0 if pool.worker_pids() == pids else float("nan")
    return wall, cpu + time.process_time() - own0, scores, details.as_dict()


def code_cpu_per_response(records: list, responses: list, k: int = 64) -> dict:
    """CPU seconds per code response, scored one at a time in this process (k samples).

    Sums this process's CPU, its reaped children's (bwrap) and what the runner reports for
    itself and its tests. Kernel work of namespace set-up/tear-down that no process is charged
    for is not included, so this is a lower bound; workers x wall is the upper bound.
    """
    from rewards.code_grader import DEFAULT_LIMITS
    from rewards.extract import last_code_block
    from rewards.sandbox import run_tests

    k = min(k, len(records))
    kids0, own0, sandbox_s = resource.getrusage(resource.RUSAGE_CHILDREN), time.process_time(), 0.0
    t0 = time.perf_counter()
    for record, response in zip(records[:k], responses[:k]):
        stats: dict = {}
        run_tests(last_code_block(response), record["tests"]["inputs"], limits=DEFAULT_LIMITS,
                  stats=stats)
        sandbox_s += stats.get("sandbox_cpu_s", 0.0)
    wall_s = time.perf_counter() - t0
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    host_s = time.process_time() - own0 + (kids1.ru_utime + kids1.ru_stime
                                           - kids0.ru_utime - kids0.ru_stime)
    return {"samples": k, "cpu_ms_per_response": round(1e3 * (host_s + sandbox_s) / k, 1),
            "sequential_wall_ms_per_response": round(1e3 * wall_s / k, 1)}


def adversarial_items(n: int) -> dict[str, list[tuple[str, dict, str]]]:
    """{domain: [(attack name, record, response of about n characters)]}: the attacks of
    issue 12 (unclosed tags and boxes, whitespace runs, bracket spam) and answers just under
    each cap, which make the checkers do their most work."""
    from rewards import ifeval_checks as ic
    from rewards.ifeval_grader import MAX_ANSWER_CHARS

    think = "<think>" + "step " * (n // 5) + "</think>"
    logic = {r["task"]: r for r in rewards.logic_records(("sudoku", "countdown", "word_ladder"),
                                                         size=1, seed=0)}
    values = {"keywords": ["cat"], "keyword": "cat", "frequency": 2, "relation": "at least",
              "forbidden_words": ["dog"], "letter": "a", "let_frequency": 3, "let_relation":
              "less than", "language": "en", "num_sentences": 3, "num_paragraphs": 2,
              "num_words": 50, "nth_paragraph": 1, "first_word": "the", "num_placeholders": 2,
              "postscript_marker": "P.S.", "num_bullets": 2, "num_highlights": 2,
              "section_spliter": "SECTION", "num_sections": 2, "prompt_to_repeat": "Say hi.",
              "end_phrase": "Bye.", "capital_frequency": 3, "capital_relation": "at least"}
    ids = sorted(ic.INSTRUCTION_KWARGS)
    ifeval = {"domain": "ifeval", "instruction_id_list": ids,
              "kwargs": [{k: values[k] for k in ic.INSTRUCTION_KWARGS[i]} for i in ids]}
    under = MAX_ANSWER_CHARS - 16
    code_tests = {"inputs": ["1 2\n"] * 10, "outputs": ["3\n"] * 10}
    fill = lambda unit, size=n: (unit * (size // len(unit) + 1))[:size]
    math, stem, code = ({"domain": "math", "answer": "5"}, {"domain": "stem", "answer": "2.5"},
                        {"domain": "code", "tests": code_tests})
    program = fill("# pad\n", 60_000) + "print(sum(map(int, input().split())))\n"
    tagged = lambda body: "</think><answer>" + body + "</answer>"
    return {
        "math": [("unclosed boxes", math, "</think>" + fill("\\boxed{")),
                 ("unclosed think", math, fill("<think>") + "</think>x"),
                 ("boxes, last right", math, "</think>" + fill("\\boxed{4} ") + "\\boxed{5}"),
                 ("long reasoning, power tower", math, think + "\\boxed{9^{9^{9^{9}}}}"),
                 ("nested 8 deep", math, think + "\\boxed{" + "(" * 8 + "5" + ")" * 8 + "}")],
        "stem": [("answer lines", stem, "</think>" + fill("answer: 2.4\n")),
                 ("unclosed boxes", stem, "</think>" + fill("\\boxed{"))],
        "code": [("unclosed fences", code, "</think>" + fill("```python\n")),
                 ("program just under the scan cap", code, "<think>" + fill("step ", n - 60_000)
                  + "</think>```python\n" + program + "```")],
        "logic": [("unclosed answers", logic["sudoku"], "</think>" + fill("<answer>")),
                  ("answers, last long", logic["word_ladder"], "</think>"
                   + fill("<answer>x</answer>", n // 2) + tagged(fill("A,", 16000))),
                  ("long expression", logic["countdown"], tagged(fill("1+", 500) + "1")),
                  ("sudoku under cap", logic["sudoku"], tagged(fill("1 2 3\n", 16000)))],
        "ifeval": [("title brackets", ifeval, "</think>" + fill("<<")),
                   ("whitespace runs", ifeval, "</think>x" + fill(" \n")),
                   ("placeholders", ifeval, "</think>" + fill("[")),
                   ("sentences under cap", ifeval, "</think>" + fill("a. ", under)),
                   ("abbreviations under cap", ifeval, "</think>" + fill("Dr. DON'T ", under)),
                   ("prose under cap", ifeval,
                    "</think>" + fill("The CAT sat on the mat. ", under))],
    }


def worst_case(n_chars: int, workers: int, domains: list[str] | None = None) -> dict:
    """Per domain: the slowest adversarial item scored in this process (rewards.score), and the
    same items through a pool (score_batch): its wall time and any timeouts."""
    report = {}
    items = {d: a for d, a in adversarial_items(n_chars).items() if not domains or d in domains}
    for domain, attacks in items.items():  # imports (nltk, langdetect profiles) outside timing
        rewards.score(attacks[0][1], "</think>Say hi. The CAT sat.")
    for domain, attacks in items.items():
        times = []
        for name, record, response in attacks:
            t0, c0 = time.perf_counter(), time.process_time()
            rewards.score(record, response)
            times.append((time.perf_counter() - t0, time.process_time() - c0, name))
        slowest = max(times)
        report[domain] = {"worst_s": round(slowest[0], 3), "worst_cpu_s": round(slowest[1], 3),
                          "worst_attack": slowest[2], "items": len(attacks), "chars": n_chars,
                          "load_avg_1min": round(os.getloadavg()[0], 2)}
    flat = [(r, x) for attacks in items.values() for _, r, x in attacks]
    with rewards.RewardPool(workers) as pool:
        pool.score_batch(*map(list, zip(*flat[:1])))
        t0 = time.perf_counter()
        _, details = pool.score_batch([r for r, _ in flat], [x for _, x in flat],
                                      return_details=True)
        report["pool"] = {"items": len(flat), "wall_s": round(time.perf_counter() - t0, 2),
                          "num_timed_out": details.num_timed_out,
                          "num_crashed": details.num_crashed}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-math", type=int, default=4096)
    parser.add_argument("--num-code", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--worst-chars", type=int, default=200_000)
    parser.add_argument("--worst-domains", default="math,stem,code,logic,ifeval",
                        help="comma-separated domains of the worst-case phase")
    args = parser.parse_args()
    rng = random.Random(0)
    report = {"cpus": os.cpu_count(), "workers": args.workers}
    phases = [("math", math_batch, args.num_math, 15.0), ("code", code_batch, args.num_code, 30.0)]
    for name, make_batch, n, target_s in phases:
        warmup, (records, responses) = make_batch(n, rng), make_batch(n, rng)  # distinct draws
        with rewards.RewardPool(args.workers) as pool:
            t0 = time.perf_counter()
            timed(pool, *warmup)
            first_s = time.perf_counter() - t0  # includes starting the workers
            wall_s, cpu_s, scores, details = timed(pool, records, responses)
        report[name] = {"items": len(records), "first_call_s": round(first_s, 2),
                        "wall_s": round(wall_s, 2), "cpu_s": round(cpu_s, 2),
                        "cpu_s_per_item_ms": round(1e3 * cpu_s / len(records), 2),
                        "idle_wall_s_estimate": round(cpu_s / min(args.workers, os.cpu_count()), 2),
                        "target_s": target_s, "load_avg_1min": round(os.getloadavg()[0], 2),
                        "mean_reward": round(sum(scores) / len(scores), 3), **details}
        print(f"{name}: {len(records)} items  first call {first_s:.2f} s  steady {wall_s:.2f} s "
              f"wall, {cpu_s:.2f} CPU-s (target < {target_s:.0f} s, load "
              f"{os.getloadavg()[0]:.1f})  {details}", flush=True)
    records, responses = code_batch(args.num_code, rng)
    profile = code_cpu_per_response(records, responses)
    sandbox_s = profile["cpu_ms_per_response"] / 1e3 * args.num_code
    code = report["code"]
    code["cpu_profile"] = profile
    # workers and caller (measured on the pool) + sandboxes (profiled), over the cores
    code["idle_wall_s_estimate"] = round((code["cpu_s"] + sandbox_s) / min(args.workers,
                                                                           os.cpu_count()), 2)
    print(f"code CPU (lower bound): {profile['cpu_ms_per_response']} ms per response (host + "
          f"sandbox) -> about {code['idle_wall_s_estimate']} s for {args.num_code} responses on "
          f"an idle machine", flush=True)
    report["worst_case"] = worst_case(args.worst_chars, args.workers,
                                      args.worst_domains.split(","))
    for domain, row in report["worst_case"].items():
        print(f"worst case {domain}: {row}", flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
