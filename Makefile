# Two commands do all set-up on a fresh machine (idempotent):
#   make run    the main job: a mask-ratio sweep on Fashion-MNIST on an embedded local Ray
#   make test   the test suite (CI runs exactly this, through .ci/run)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= /usr/share/datasets/fashion-mnist

.PHONY: run test setup dataset pretrain clean

setup: $(VENV)/.installed dataset

# pip takes torch/torchvision from this machine's disk where they lie there (see README).
# On Linux x86_64 a new venv needs about 7 GB (6.5 GB measured, most of it torch's CUDA build, which pip
# takes there): say so before pip fails half-way.
$(VENV)/.installed: pyproject.toml
	@if [ "$$(uname -sm)" = "Linux x86_64" ] && ! ls -d $(VENV)/lib/python*/site-packages/torch >/dev/null 2>&1; then \
		at="$(abspath $(VENV))"; while [ ! -d "$$at" ]; do at=$$(dirname "$$at"); done; \
		free_kb=$$(df -Pk "$$at" 2>/dev/null | awk 'NR == 2 {print $$4}'); \
		if [ -n "$$free_kb" ] && [ "$$free_kb" -lt 7000000 ]; then \
			echo "set-up needs about 7 GB free for $(VENV) (torch's CUDA build), and only $$((free_kb / 1048576)) GB are:"; \
			echo "free some disk space (or set VENV to a folder on a larger disk) and run make again"; exit 1; \
		fi; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Debian's dataset-fashion-mnist; installed with apt-get where we are root (or have sudo).
dataset:
	@if [ -n "$$MAE_DATA_DIR" ] || ls $(DATA)/train-images-idx3-ubyte* >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist); \
	elif sudo -n true 2>/dev/null; then \
		sudo apt-get install -y -q dataset-fashion-mnist || (sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist); \
	else \
		echo "Fashion-MNIST is not in $(DATA) and apt-get needs root: run"; \
		echo "  sudo apt-get install dataset-fashion-mnist"; \
		echo "or set MAE_DATA_DIR to a folder holding the four IDX files."; exit 1; \
	fi

# ARGS passes flags on: make run ARGS=--resume (continue an interrupted sweep), ARGS='--name other'
run: setup
	$(PY) ray_jobs/sweep_mask_ratio.py $(ARGS)

# A single pretrain + quick probe without Ray.
pretrain: setup
	$(PY) -m mae pretrain --config experiments/fashion_mnist.yaml

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf runs results .pytest_cache
