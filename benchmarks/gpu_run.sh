#!/usr/bin/env bash
# benchmarks/gpu_run.py on a GPU machine without network (docs/gpu.md).
#
#   bash benchmarks/gpu_run.sh prepare     # here, with network: the wheels the GPU image lacks -> .devcarry/wheels
#   bash benchmarks/gpu_run.sh [ARGS...]   # on the GPU machine: install the carried wheels, run gpu_run.py ARGS
#
# `prepare` takes each version from this checkout's virtual environment (PYTHON, default .venv/bin/python), so the
# GPU run uses what the CPU tests used. The GPU image already has torch, accelerate, peft, triton, tokenizers,
# safetensors, huggingface-hub, einops, msgpack, ninja, psutil, py-cpuinfo, numpy, packaging and tqdm; it lacks
# DeepSpeed (published as a source archive only: built here into a pure-Python wheel, no compiled ops; the recipes
# use PyTorch's AdamW, so no DeepSpeed op is ever JIT-built) and its hjson and pydantic (+ pydantic-core,
# annotated-types, typing-inspection, typing-extensions), and easy-vqa (the data). transformers and regex are carried
# too, so that the GPU run uses the transformers version the CPU tests use (the image has an older 5.x).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.devcarry/wheels

if [ "${1:-}" = prepare ]; then
  PY=${PYTHON:-.venv/bin/python}
  ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
  rm -rf "$WHEELS" .devcarry/sdist
  mkdir -p "$WHEELS" .devcarry/sdist
  # the GPU image's Python is 3.12 on x86-64
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$WHEELS" \
    "hjson==$(ver hjson)" "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" \
    "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)" \
    "typing-extensions==$(ver typing-extensions)" "easy-vqa==$(ver easy-vqa)" \
    "transformers==$(ver transformers)" "regex==$(ver regex)"
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d .devcarry/sdist "deepspeed==$(ver deepspeed)"
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" .devcarry/sdist/deepspeed-*.tar.gz
  ls -1 "$WHEELS"
  du -sh "$WHEELS"
  exit 0
fi

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package itself, uninstalled
export PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_run.py "$@"
