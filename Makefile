# Set-up and main entry points. `make demo` and `make test` work on a fresh machine: they create .venv,
# install the CPU build of torch first (a bare `torch` requirement would pull a multi-GB CUDA build), then neurosdm.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.neurosdm-installed

.PHONY: demo test bench install clean lava sanafe

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

# SANA-FE (GPL, a 2 MB binary wheel) in its own environment, for tests/test_sanafe.py's cross-check and `make sanafe`.
# Wheels exist for cp310 and cp311 only: elsewhere the environment is not built and the cross-check skips.
.venv-sanafe/.sanafe-installed:
	scripts/sanafe_env.sh $(PYTHON) || echo "note: .venv-sanafe not built; tests/test_sanafe.py's cross-check will skip"

test: $(VENV)/.peers-installed .venv-sanafe/.sanafe-installed
	$(PY) -m pytest

# neurosdm vs SANA-FE on the same networks and inputs: docs/data/sanafe_compare.json and docs/sanafe.md's tables.
sanafe: $(STAMP) .venv-sanafe/.sanafe-installed
	NEUROSDM_PYTHON=$(PY) scripts/sanafe_compare.sh

# Benchmarks compare against spikingjelly, installed without its torchvision requirement (see DESIGN.md).
bench: $(VENV)/.peers-installed
	$(PY) benchmarks/if_layer.py --threads 1
	$(PY) benchmarks/train_speed.py --threads 1

# Loihi arithmetic through Lava (docs/lava.md): builds .venv-lava (Python 3.10, lava-nc, lava-dl; a few GB) and
# compares Lava's bit-accurate LIF and netx with neurosdm's fixed point.
lava: $(STAMP)
	NEUROSDM_PYTHON=$(PY) scripts/lava_compare.sh

clean:
	rm -rf $(VENV) .venv-sanafe demo_out
