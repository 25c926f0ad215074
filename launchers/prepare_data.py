"""Converts ProRL's public training sets and common validation sets into problem records.

    python launchers/prepare_data.py all --input_dir DIR --out_dir data/ [--hub] [--paper_sizes]
    python launchers/prepare_data.py SOURCE --input PATH_OR_HUB_NAME --out FILE.jsonl
    python launchers/prepare_data.py reasoning_gym --out data/logic.jsonl [--total 37000]
    python launchers/prepare_data.py reasoning_gym --seed 1 --size 10 --exclude_file \\
        data/logic.jsonl --out data/val/logic.jsonl            # held-out validation seeds
    python launchers/prepare_data.py humaneval --out data/val/humaneval.jsonl   # offline
    python launchers/prepare_data.py scan_logic                # re-measure the logic task list
    python launchers/prepare_data.py check_humaneval           # canonical solutions vs tests

SOURCE is one of deepscaler, eurus_code, scp116k, nemotron_if (training) or aime, gpqa,
ifeval_input, humaneval (validation); the formats each reads are documented in
prorl_jax/prepare/{math,code,stem,ifeval}_sets.py, the mix in prorl_jax/prepare/sources.py.
`all` writes OUT_DIR/{math,code,stem,logic,ifeval}.jsonl and OUT_DIR/val/*.jsonl and prints a
summary table (rows read, written, skipped by reason, bad) per source. A malformed row stops the
run naming its file, row and field, unless --skip_bad.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from prorl_jax.data import DataError  # noqa: E402
from prorl_jax.prepare import logic_scan, logic_sets, pipeline  # noqa: E402
from prorl_jax.prepare.rows import summary_table  # noqa: E402
from prorl_jax.prepare.sources import DOMAIN_FILES, SOURCES  # noqa: E402


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=None, help="stop after N records per source")
    p.add_argument("--skip_bad", action="store_true", help="count malformed rows, do not stop")
    p.add_argument("--keep_system", action="store_true",
                   help="eurus_code/nemotron_if: keep the source's system prompt")
    p.add_argument("--require_agreement", action="store_true",
                   help="scp116k (original release): only rows a model solution agreed with")
    p.add_argument("--max_answer_chars", type=int, default=None,
                   help="scp116k: skip answers longer than this")
    p.add_argument("--max_tests", type=int, default=None,
                   help="eurus_code: score at most this many tests per problem")
    p.add_argument("--seed", type=int, default=None,
                   help="gpqa: option shuffle seed; reasoning_gym: generator seed; all: subsets")


def _logic(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default="", help="comma-separated reasoning-gym tasks "
                   "(default: every task the recorded scan kept)")
    p.add_argument("--total", type=int, default=logic_sets.PAPER_TOTAL,
                   help="problems in all, spread over the tasks (paper: 37,000)")
    p.add_argument("--size", type=int, default=None, help="problems per task (overrides --total)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--exclude_file", default=None,
                   help="drop problems whose question is in this logic file (held-out sets)")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("all", help="the five training files of the paper's mix + validation")
    p.add_argument("--input_dir", required=True, help="local copies, one per source name")
    p.add_argument("--out_dir", default="data")
    p.add_argument("--hub", action="store_true", help="read missing sources from the hub")
    p.add_argument("--domains", default=",".join(DOMAIN_FILES))
    p.add_argument("--no_val", action="store_true", help="do not write data/val/")
    p.add_argument("--paper_sizes", action="store_true",
                   help="seeded subsets of the paper's sizes (math 40k, code 24k, stem 25k, "
                        "ifeval 10k)")
    p.add_argument("--logic_total", type=int, default=logic_sets.PAPER_TOTAL)
    p.add_argument("--logic_tasks", default="", help="comma-separated reasoning-gym tasks "
                   "(default: every task the recorded scan kept)")
    p.add_argument("--val_logic_per_task", type=int, default=pipeline.VAL_LOGIC_PER_TASK)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    _common(p)
    for name, source in SOURCES.items():
        p = sub.add_parser(name, help=f"{source.domain}: {source.hub or 'offline'}")
        p.add_argument("--input", default="" if name == "humaneval" else None,
                       required=name != "humaneval",
                       help="local file/directory, or a hub dataset name")
        p.add_argument("--out", required=True)
        p.add_argument("--hf_config", default=None, help=f"hub config (default "
                       f"{source.hub_config})")
        p.add_argument("--split", default=None, help=f"hub split (default {source.hub_split})")
        _common(p)
    p = sub.add_parser("reasoning_gym", help="logic: generated offline")
    p.add_argument("--out", required=True)
    _logic(p)
    p.add_argument("--seed", type=int, default=logic_sets.TRAIN_SEED)
    p = sub.add_parser("check_humaneval", help="score HumanEval's canonical solutions on the "
                       "converted tests (sandbox)")
    p.add_argument("--workers", type=int, default=2)
    p = sub.add_parser("scan_logic", help="measure which reasoning-gym tasks score reliably")
    p.add_argument("--size", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=logic_scan.record_path())
    return parser.parse_args(argv)


def _options(args) -> dict[str, dict]:
    """Per-source converter options from the flags."""
    opts = {"eurus_code": {"keep_system": args.keep_system, "max_tests": args.max_tests},
            "nemotron_if": {"keep_system": args.keep_system},
            "scp116k": {"require_agreement": args.require_agreement,
                        "max_answer_chars": args.max_answer_chars}}
    if args.seed is not None:
        opts["gpqa"] = {"seed": args.seed}
    return opts


def _task_list(spec: str) -> list[str] | None:
    return [t.strip() for t in spec.split(",") if t.strip()] or None


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.command == "scan_logic":
        scans = logic_scan.scan_all(args.size, args.seed)
        path = logic_scan.write_record(scans, args.size, args.seed, args.out)
        print(f"kept {sum(s.kept for s in scans)} of {len(scans)} tasks -> {path}")
        return scans
    if args.command == "check_humaneval":
        counts = pipeline.check_humaneval(args.workers)
        print(counts)
        return [counts]
    if args.command == "reasoning_gym":
        reports = [pipeline.run_logic(args.out, total=args.total, size=args.size,
                                      seed=args.seed, tasks=_task_list(args.tasks),
                                      workers=args.workers,
                                      exclude_file=args.exclude_file)]
    elif args.command == "all":
        reports = pipeline.run_all(
            args.input_dir, args.out_dir, hub=args.hub, val=not args.no_val,
            domains=[d.strip() for d in args.domains.split(",") if d.strip()],
            paper_sizes=args.paper_sizes, logic_total=args.logic_total,
            logic_tasks=_task_list(args.logic_tasks),
            val_logic_per_task=args.val_logic_per_task, workers=args.workers,
            seed=args.seed or 0, limit=args.limit, skip_bad=args.skip_bad,
            options=_options(args))
    else:
        reports = [pipeline.run_source(SOURCES[args.command], args.input, args.out,
                                       limit=args.limit, skip_bad=args.skip_bad,
                                       hub_config=args.hf_config, hub_split=args.split,
                                       **_options(args).get(args.command, {}))]
    print(summary_table(reports))
    if args.command == "all":
        print(pipeline.train_files_flag(reports))
    return reports


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
