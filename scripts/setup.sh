#!/usr/bin/env bash
# Set up llmkit in ./.venv: a CPU build of torch where there is no GPU, then llmkit itself.
#   bash scripts/setup.sh          # runtime + test dependencies
#   LLMKIT_EXTRAS=dev,bench bash scripts/setup.sh
# A CUDA machine gets pip's default torch (CUDA) build; a machine without one gets a CPU build:
# a CPU wheel already known to pip (its find-links) if there is one, else PyTorch's CPU index.
# Torch is never pinned: the project asks for torch>=2.5 and whatever CPU build is found fits.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LLMKIT_VENV:-.venv}
EXTRAS=${LLMKIT_EXTRAS:-dev}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# pip's own notices about unreachable index locations are noise here; real errors still show.
pip() {
  "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location .* is ignored" >&2)
}

have_torch() { "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; }
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if ! have_torch; then
  if has_gpu; then
    echo "setup: NVIDIA GPU found: installing the default (CUDA) torch build" >&2
    pip install -q "torch>=2.5"
  else
    # A CPU wheel in pip's find-links directories (e.g. a local wheelhouse) wins: no download.
    pyver=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    links="${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true)"
    wheel=""
    for dir in $links; do
      [ -d "$dir" ] || continue
      cand=$(ls "$dir"/torch-*+cpu-"$pyver"-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
      [ -n "$cand" ] && wheel=$cand
    done
    if [ -n "$wheel" ]; then
      echo "setup: no GPU: installing the CPU build of torch from $wheel" >&2
      pip install -q "$wheel"
    else
      echo "setup: no GPU: installing torch from PyTorch's CPU index" >&2
      pip install -q "torch>=2.5" --index-url "${LLMKIT_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
  fi
fi
# torch is now present, so this resolves the rest without touching it.
pip install -q -e ".[${EXTRAS}]"
echo "setup: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2
