# Two commands for a fresh machine (see README.md):
#   make demo   sets up .venv and runs the main job
#   make test   sets up .venv and runs the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu hypergrad/*.py tgda_attack/*.py tgda_attack/*/*.py)

.PHONY: demo test bench gpu-check install clean

demo: $(VENV)/.installed
	$(VENV)/bin/tgda-attack run --dataset mnist-sample --defender lr --epsilon 0.03 --seed 0 --out runs/demo --overwrite

test: $(VENV)/.installed
	cd tests && $(abspath $(PY)) -m pytest -q .

# The benchmark summary (issue 4's table; writes benchmark-summary.json). torchopt is the peer
# library of part (d); without it that part is skipped.
bench: $(VENV)/.installed
	-$(PY) -m pip install -q torchopt
	$(PY) benchmarks/summary.py

gpu-check:
	bash benchmarks/gpu_check.sh

install: $(VENV)/.installed

# pip builds hypergrad._C in an isolated environment against the pinned torch, then installs the
# package (the tests run against the installed package, not the source tree).
$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install '.[test]'
	cd / && $(abspath $(PY)) -c "import hypergrad, json; print(json.dumps(hypergrad.build_info(), indent=1))"  # the installed package, not ./hypergrad
	touch $@

clean:
	rm -rf build dist *.egg-info $(VENV)
