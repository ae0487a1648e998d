# Set-up and main entry points. `make demo` and `make test` work on a fresh machine: they create .venv,
# install the CPU build of torch first (a bare `torch` requirement would pull a multi-GB CUDA build), then neurosdm.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.neurosdm-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neurosdm demo --out demo_out

# Peer frameworks for the parity, NIR-reader and NeuroBench-count tests, pinned (docs/peer-readers.md was generated with these) and
# without their dependencies: spikingjelly's torchvision and snnTorch/Norse's unpinned torch would replace the CPU
# torch with a multi-GB CUDA build (see DESIGN.md).
$(VENV)/.peers-installed: $(STAMP)
	$(PY) -m pip install -q --no-deps spikingjelly==2.0.0 nirtorch==2.6 norse==1.1.0 snntorch==1.0.0 neurobench==2.3.0
	$(PY) -m pip install -q loguru packaging scipy
	touch $@

test: $(VENV)/.peers-installed
	$(PY) -m pytest

# Benchmarks compare against spikingjelly, installed without its torchvision requirement (see DESIGN.md).
bench: $(VENV)/.peers-installed
	$(PY) benchmarks/if_layer.py --threads 1
	$(PY) benchmarks/train_speed.py --threads 1

clean:
	rm -rf $(VENV) demo_out
