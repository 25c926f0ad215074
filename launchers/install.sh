#!/usr/bin/env bash
# Installs prorl-jax and everything its tests need on a fresh Debian/Ubuntu machine (CPU).
# Usage: bash launchers/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if ! command -v bwrap >/dev/null 2>&1; then  # bubblewrap: the sandbox for generated code
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bubblewrap >/dev/null
fi
python -m pip install -q torch==2.13.0  # the CPU build (a plain `torch` would pull CUDA wheels)
python -m pip install -q -c launchers/constraints.txt -e '.[test,plot]'  # tested versions
# lm-eval's IFEval checker: the independent reference of tests/test_rewards_ifeval_reference.py
# (without its heavy dependencies; the test imports only the IFEval files)
python -m pip install -q --no-deps lm-eval==0.4.13
