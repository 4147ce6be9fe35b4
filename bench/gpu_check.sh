#!/usr/bin/env bash
# The GPU device check in one command, on a machine with an NVIDIA GPU and a CUDA build of PyTorch:
#   bash bench/gpu_check.sh [bench/gpu_check.py options]       (default: the 11B shape on cuda)
# It runs with .venv/bin/python when `make setup` made one (PYTHON=... to choose another). A machine
# whose Python has PyTorch but older transformers (or none of llamascope's engine needs) takes them as
# wheels from .whl/, made beforehand on any machine with pip (they install nowhere but /tmp):
#   bash bench/gpu_check.sh --fetch-wheels
set -euo pipefail
cd "$(dirname "$0")/.."
# The venv `make setup` made (with TORCH_INDEX_URL for a CUDA torch, or SYSTEM_TORCH=1), else this Python.
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
if [ "${1:-}" = "--fetch-wheels" ]; then
  # Everything the check imports beyond PyTorch and the standard library, at constraints.txt's versions
  # (about 45 MB): what the machine lacks, or has older (transformers), it takes from here.
  names='transformers|huggingface_hub|hf-xet|tokenizers|safetensors|regex|pyyaml|tqdm|packaging|numpy|pillow'
  names+='|anyio|sniffio|idna|h11|httpx2|httpcore2|truststore|psutil|pydantic|pydantic_core|pydantic-settings'
  names+='|python-dotenv|annotated-types|typing-inspection|prometheus_client|zstandard|protobuf'
  mapfile -t wanted < <(grep -iE "^(${names})==" constraints.txt)
  platforms=()
  for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${wanted[@]}"
  exit 0
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/llamascope-site .whl/*.whl
  export PYTHONPATH=/tmp/llamascope-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
exec timeout "${GPU_CHECK_SECONDS:-480}" "$PY" bench/gpu_check.py "$@"
