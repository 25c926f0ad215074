"""Prompt templates, as the sources and the paper use them. The text goes into the record's
`prompt`; the tokenizer's chat template (prorl_jax.data.encode_prompts) wraps it at training time.

- math (DeepScaleR, AIME-style sets): the problem, a space, then DeepScaleR's instruction, which
  ProRL kept: "Let's think step by step and output the final answer within \\boxed{}."
- STEM (SCP-116K): the problem and a boxed-answer instruction (the math grader's rule: the last
  \\boxed{} after </think>); multiple choice (GPQA-style) asks for the option letter boxed.
- logic (reasoning-gym): reasoning-gym's own default system prompt (it asks for
  <answer>...</answer>, which rewards.logic_grader reads) as a system message, the question as
  the user message.
- code (Eurus-2-RL-Data): the user message as the data gives it; it already ends with Eurus'
  instruction (EURUS_CODE_INSTRUCTION). HumanEval prompts get the same instruction.
- instruction following (Llama-Nemotron, IFEval): the prompt as given.
"""
from __future__ import annotations

MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
STEM_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("Please reason step by step, and put the letter of the correct option "
                      "within \\boxed{}.")
EURUS_CODE_INSTRUCTION = ("Write Python code to solve the problem. Present the code in \n"
                          "```python\nYour code\n```\nat the end.")
CHOICE_LETTERS = "ABCDEFGHIJ"


def math_prompt(problem: str) -> str:
    return f"{problem.strip()} {MATH_INSTRUCTION}"


def stem_prompt(problem: str) -> str:
    return f"{problem.strip()}\n\n{STEM_INSTRUCTION}"


def choice_prompt(question: str, options: list[str]) -> str:
    """The question, then one "X. option" line per option (X = A, B, ...), then the instruction."""
    lines = [f"{CHOICE_LETTERS[i]}. {opt.strip()}" for i, opt in enumerate(options)]
    return f"{question.strip()}\n\n" + "\n".join(lines) + f"\n\n{CHOICE_INSTRUCTION}"


def logic_system_prompt() -> str:
    """reasoning-gym's own default system prompt (asks for <answer>...</answer>)."""
    from reasoning_gym.utils import SYSTEM_PROMPTS
    return SYSTEM_PROMPTS["default"]


def logic_prompt(question: str) -> list[dict]:
    return [{"role": "system", "content": logic_system_prompt()},
            {"role": "user", "content": question}]


def code_prompt(problem: str) -> str:
    """A code problem with Eurus' instruction appended (as Eurus' own rows end)."""
    return f"{problem.rstrip()}\n\n{EURUS_CODE_INSTRUCTION}"
