#!/usr/bin/env bash
# Downloads, on a machine with the package registries, the wheels that benchmarks/gpu_check.sh needs
# on a GPU machine without network: torchopt (part d's peer library) and what it imports, for
# Python 3.12 on x86-64 Linux (the GPU machines). Carry benchmarks/wheels to that machine; about 17 MB.
#   bash benchmarks/download_wheels.sh [PYTHON_VERSION]
set -euo pipefail
dest="$(cd "$(dirname "$0")" && pwd)/wheels"
python=${PYTHON:-python3}
"$python" -m pip download -q --only-binary=:all: --no-deps --python-version "${1:-3.12}" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$dest" torchopt==0.7.3 optree typing-extensions graphviz numpy
ls -l "$dest"
