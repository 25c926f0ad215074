#!/usr/bin/env bash
# Starts one vLLM server for prorl-jax rollouts (prorl_jax.rollout.VLLMClient), with every
# setting the client relies on (docs/vllm.md):
#   VLLM_SERVER_DEV_MODE=1             /collective_rpc, /pause, /resume, /reset_prefix_cache
#   --worker-extension-cls ...         prorl_jax.rollout.vllm_worker.WeightSyncExtension, which
#                                      reloads the policy directories the trainer writes
#                                      (prorl_jax must be importable by the server's python)
#   --logprobs-mode processed_logprobs log-probs of the tempered distribution sampled from
#   --generation-config vllm           no sampling defaults taken from the model's files
#   --enable-prefix-caching            the client resets the cache after every weight update
#
# SAFETY: dev mode lets anyone who reaches the port run ANY worker method through
# /collective_rpc (and pause the server, reload weights from any path); --api-key does not
# cover these routes. So the server binds 127.0.0.1 unless HOST is given: set HOST to an
# interface only the trainer's network reaches (a cluster-internal address), never 0.0.0.0 on
# a shared network.
#
# Usage: bash launchers/vllm_server.sh MODEL_PATH [extra vllm serve flags...]
# Environment (defaults in brackets):
#   PORT [8000]  HOST [127.0.0.1]  TP_SIZE: tensor parallel size [1]
#   MAX_MODEL_LEN: prompt + response tokens [8192]  DTYPE [bfloat16]
#   GPU_MEMORY_UTILIZATION [0.85]  SEED [0]  SERVED_MODEL_NAME [MODEL_PATH]
#   VLLM: the vllm executable [vllm]
# Data parallelism: start one server per rank (its own GPUs and PORT) and list every URL in
# config.rollout.vllm_urls; DP_SIZE > 1 in one server is refused, because /collective_rpc
# reports only its first engine and a weight sync could not be verified on the others.
# Example:
#   PORT=8001 TP_SIZE=2 HOST=10.0.0.5 bash launchers/vllm_server.sh /ckpt/DeepSeek-R1-Distill-Qwen-1.5B
# Then: VLLMClient(base_urls=["http://10.0.0.5:8001"], weights_dir=<dir this server can read>)
set -euo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
  [ $# -ge 1 ] && exit 0 || exit 2
fi
MODEL_PATH="$1"; shift
if [ "${DP_SIZE:-1}" != 1 ]; then
  echo "vllm_server.sh: DP_SIZE=${DP_SIZE} refused: start one server per data-parallel rank" \
       "(own GPUs and PORT) and list every URL in config.rollout.vllm_urls" >&2
  exit 2
fi
if [ "${HOST:-127.0.0.1}" = "0.0.0.0" ] || [ "${HOST:-}" = "::" ]; then
  echo "vllm_server.sh: warning: HOST=${HOST} exposes /collective_rpc (any worker method) on" \
       "every interface; use the cluster-internal address instead" >&2
fi

export VLLM_SERVER_DEV_MODE=1
# The server process imports the worker extension from this checkout.
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"

exec "${VLLM:-vllm}" serve "${MODEL_PATH}" \
  --host "${HOST:-127.0.0.1}" \
  --port "${PORT:-8000}" \
  --served-model-name "${SERVED_MODEL_NAME:-${MODEL_PATH}}" \
  --tensor-parallel-size "${TP_SIZE:-1}" \
  --max-model-len "${MAX_MODEL_LEN:-8192}" \
  --dtype "${DTYPE:-bfloat16}" \
  --gpu-memory-utilization "${GPU_MEMORY_UTILIZATION:-0.85}" \
  --seed "${SEED:-0}" \
  --worker-extension-cls prorl_jax.rollout.vllm_worker.WeightSyncExtension \
  --logprobs-mode processed_logprobs \
  --generation-config vllm \
  --enable-prefix-caching \
  "$@"
