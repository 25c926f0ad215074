#!/usr/bin/env bash
# Every GPU figure of the project in one run: bench/gpu_suite.py (its docstring lists them),
# written to one JSON file under bench/results/. Downloads nothing (random weights of the 1.5B
# shape; transformers builds its peer models from configs).
#
#   bash bench/gpu_suite.sh                 # on one GPU: bench/results/gpu_suite-<host>-<time>.json
#   SMOKE=1 bash bench/gpu_suite.sh         # tiny shapes on CPU (a couple of minutes): checks it
#   OUT=path.json BUDGET_S=450 bash bench/gpu_suite.sh
#
# On the project's H200 device machine (JAX 0.11.2, torch 2.11, transformers 5.17, Python 3.12
# there; see /work/.library/device/README.md): the benchmarks need no ml-collections, so nothing
# has to be carried. From the repository root, as one device `run` call with timeout_s=600:
#   PYTHONUNBUFFERED=1 OUT=$OUT/gpu_suite.json bash bench/gpu_suite.sh 2>&1 | tee $OUT/log
# then copy the JSON it brings back to bench/results/ and commit it. (Anything that imports
# configs/ or prorl_jax.main there needs ml-collections: carry its wheel as the README's
# nvidia-h200 note says, `pip download ... -d .whl ml-collections==1.1.0`, and install it with
# the note's `pip install --target /tmp/site` line first.)
# BUDGET_S (default 450) stops starting figures after that many seconds, so the run ends in
# under 8 minutes; skipped figures are named in the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stamp="$(date +%Y%m%d-%H%M%S)"
if [[ "${SMOKE:-0}" == "1" ]]; then
    export JAX_PLATFORMS=cpu
    out="${OUT:-/tmp/gpu_suite-smoke-$stamp.json}"
    exec python bench/gpu_suite.py --smoke --budget-s "${BUDGET_S:-600}" --out "$out"
fi
# JAX takes 75% of the GPU by default; leave the torch peers (run first, in their own
# processes) and XLA's autotuning some room.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}"
out="${OUT:-bench/results/gpu_suite-$(hostname)-$stamp.json}"
exec python bench/gpu_suite.py --budget-s "${BUDGET_S:-450}" --out "$out"
