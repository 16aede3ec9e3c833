#!/usr/bin/env bash
# GPU check: on a machine with a GPU, torch preinstalled and no network, builds hypergrad._C
# against that torch, runs the CUDA tests and prints the benchmark summary (issue 4's table).
#   bash benchmarks/gpu_check.sh        (about 8 minutes on one H100/H200; OUT=dir keeps the JSON)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python=${PYTHON:-python}
out=${OUT:-/tmp}
cd "$repo"
echo "== build (pip install --no-build-isolation --no-deps .)"
time "$python" -m pip install -q --no-build-isolation --no-deps .
cd /tmp  # import the installed package, not the source tree
"$python" -c "import hypergrad, json, torch; print(json.dumps(hypergrad.build_info(), indent=1)); print(torch.cuda.get_device_name())"
echo "== CUDA tests"
"$python" -m pytest -q -p no:cacheprovider "$repo/tests" -m cuda
echo "== benchmark summary"
"$python" "$repo/benchmarks/summary.py" --json "$out/benchmark-summary-gpu.json"
