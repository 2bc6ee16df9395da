#!/usr/bin/env bash
# Build .venv for flexdiff with a torch that fits this machine, then flexdiff itself (editable) with extras.
#
#   scripts/setup_venv.sh EXTRAS        e.g. test  or  test,ray
#
# Which torch (TORCH=auto, the default):
#   - a torch the Python already has (a cluster's CUDA build) is kept: the venv sees it and nothing replaces it;
#   - else, on a machine with an NVIDIA GPU (nvidia-smi lists one), pip's default torch build (CUDA);
#   - else the pinned CPU wheel, torch==2.13.0: from a local wheel folder when one holds it, otherwise
#     from PyTorch's CPU-only index (TORCH_CPU_INDEX), so no CUDA packages come in.
# TORCH=SPEC installs that requirement instead (e.g. TORCH='torch==2.5.1'); TORCH=keep installs none.
# WHEELS=DIR: install offline from that folder (pip --no-index), for a machine without network: it must hold
# the wheels of what the machine lacks (e.g. diffusers, pymoo; setuptools if the Python has none).
# CPU_ONLY=1 (CI): check afterwards that no nvidia-* package came in; the default checks it only where this
# script installed the CPU wheel itself.
set -euo pipefail

EXTRAS=${1:-test}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH=${TORCH:-auto}
CPU_ONLY=${CPU_ONLY:-auto}
CPU_TORCH=torch==2.13.0
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

links=()
for d in /opt/wheels ${WHEELS:-}; do
  if [ -d "$d" ]; then links+=(--find-links "$d"); fi
done
if [ -n "${WHEELS:-}" ]; then links+=(--no-index --no-build-isolation); fi  # offline: build with what is here

if [ ! -x "$VENV/bin/python" ]; then
  if [ "$TORCH" = auto ] && "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages "$VENV"  # the torch this Python has stays in use
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q "${links[@]}" "$@"; }
have_torch() { "$PY" -c "import torch" 2>/dev/null; }

pinned=0
case "$TORCH" in
  keep) ;;
  auto)
    if have_torch; then
      echo "using the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      pip_install torch  # a GPU machine: the default build, with CUDA
    else
      pinned=1
      if ls /opt/wheels/torch-2.13.0* ${WHEELS:+"$WHEELS"/torch-2.13.0*} >/dev/null 2>&1 || [ -n "${WHEELS:-}" ]; then
        pip_install "$CPU_TORCH"
      else
        pip_install --index-url "$TORCH_CPU_INDEX" "$CPU_TORCH"
      fi
    fi ;;
  *) pip_install "$TORCH" ;;
esac

pip_install -e ".[$EXTRAS]"

installed=$("$PY" -m pip list 2>/dev/null)  # read once: grep -q on a pipe would cut pip off (pipefail)
if [ "$pinned" = 1 ] && ! grep -Eq '^torch +2\.13\.0' <<<"$installed"; then
  echo "torch is not 2.13.0 after install" >&2; exit 1
fi
if [ "$CPU_ONLY" = 1 ] || { [ "$CPU_ONLY" = auto ] && [ "$pinned" = 1 ]; }; then
  if grep -i '^nvidia' <<<"$installed"; then
    echo "CUDA packages were pulled in on a CPU-only install" >&2; exit 1
  fi
fi
