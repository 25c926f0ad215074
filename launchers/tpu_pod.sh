#!/usr/bin/env bash
# ProRL on a Cloud TPU pod slice: the same trainer command on every worker of the slice, with
# the embedded JAX sampler for rollouts (no vLLM). jax.distributed finds the pod's workers by
# itself (prorl_jax.sharding.initialize_distributed), so no coordinator flags are passed.
#
# Usage (from the repository root, on a machine with gcloud set up):
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://bucket/runs/prorl \
#     MODEL_PATH=/mnt/models/DeepSeek-R1-Distill-Qwen-1.5B \
#     bash launchers/tpu_pod.sh [extra trainer flags, e.g. --config.total_steps=100]
# Environment (defaults in brackets):
#   TPU_NAME, ZONE  the TPU VM and its zone (required)
#   PROJECT         [gcloud's default project]
#   WORKDIR         run directory every worker can reach (GCS or a shared mount) (required)
#   MODEL_PATH      HF model directory present on every worker [config's model.path]
#   CONFIG          [configs/prorl.py]
#   REMOTE_DIR      [prorl-jax]  checkout location on the workers (relative to the home dir)
#   SYNC=1          copy this checkout to every worker first (gcloud ... scp --recurse)
#   SETUP=1         pip install the package with TPU JAX on every worker first
#   DRY_RUN=1       print the gcloud commands instead of running them
# Resume: run again with the same WORKDIR (the trainer continues from its latest checkpoint).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
: "${WORKDIR:?set WORKDIR to a run directory every worker can reach}"
CONFIG="${CONFIG:-configs/prorl.py}"
REMOTE_DIR="${REMOTE_DIR:-prorl-jax}"
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
GCLOUD=(gcloud compute tpus tpu-vm)
TARGET=("${TPU_NAME}" --zone="${ZONE}" --worker=all)
[ -n "${PROJECT:-}" ] && TARGET+=(--project="${PROJECT}")

run() {  # runs (or with DRY_RUN=1 prints) a command
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "+ $*"; else "$@"; fi
}

if [ "${SYNC:-0}" = 1 ]; then
  run "${GCLOUD[@]}" scp --recurse "${REPO_ROOT}" "${TPU_NAME}:~/${REMOTE_DIR}" \
    --zone="${ZONE}" --worker=all ${PROJECT:+--project="${PROJECT}"}
fi
if [ "${SETUP:-0}" = 1 ]; then
  run "${GCLOUD[@]}" ssh "${TARGET[@]}" \
    --command="cd ~/${REMOTE_DIR} && python3 -m pip install -q -e '.[tpu]'"
fi

TRAIN_ARGS=(--config="${CONFIG}" --workdir="${WORKDIR}" --config.rollout.engine=jax)
[ -n "${MODEL_PATH:-}" ] && TRAIN_ARGS+=(--config.model.path="${MODEL_PATH}")
TRAIN_ARGS+=("$@")
REMOTE_CMD="cd ~/${REMOTE_DIR} && python3 -m prorl_jax.main $(printf '%q ' "${TRAIN_ARGS[@]}")"
run "${GCLOUD[@]}" ssh "${TARGET[@]}" --command="${REMOTE_CMD}"
