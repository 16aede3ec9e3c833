#!/usr/bin/env bash
# GPU check: on a machine with a GPU, torch preinstalled and no network, builds hypergrad._C
# against that torch, runs the CUDA tests and prints the benchmark summary (issue 4's table).
#   bash benchmarks/gpu_check.sh        (OUT=dir keeps the JSON files; default /tmp)
# For part (d) (torchopt) on a machine without network, run `bash benchmarks/download_wheels.sh` on a
# machine with the registries first and bring benchmarks/wheels along: it is installed from there.
# Order: the main table (LR, NN and the two small CNNs, every part; the JSON is rewritten after each
# row) before ResNet-18, whose float64 rows are the slowest, so a time limit cuts the least useful part.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python=${PYTHON:-python}
out=${OUT:-/tmp}
cd "$repo"
echo "== build (pip install --no-build-isolation --no-deps .)"
time "$python" -m pip install -q --no-build-isolation --no-deps .
if [ -d "$repo/benchmarks/wheels" ]; then
  "$python" -m pip install -q --no-index --find-links "$repo/benchmarks/wheels" torchopt || echo "torchopt did not install: (d) skips"
fi
cd /tmp  # import the installed package, not the source tree
"$python" -c "import hypergrad, json, torch; print(json.dumps(hypergrad.build_info(), indent=1)); print(torch.cuda.get_device_name())"
echo "== CUDA tests"
"$python" -m pytest -q -p no:cacheprovider "$repo/tests" -m cuda
echo "== benchmark summary"
"$python" "$repo/benchmarks/summary.py" --defenders lr nn cnn cifar-cnn --json "$out/benchmark-summary-gpu.json"
echo "== benchmark summary, ResNet-18 (parts b, c; quality against MINRES-50)"
"$python" "$repo/benchmarks/summary.py" --defenders resnet18 --parts bc --repeats 1 --reference-iterations 50 \
  --json "$out/benchmark-summary-gpu-resnet18.json"
