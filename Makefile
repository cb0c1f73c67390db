# Two commands for a fresh machine: `make demo` (whole pipeline on synthetic data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo

.PHONY: demo test test-slow install clean

install: $(STAMP)

# torch first, pinned: the CPU/CUDA wheels of this exact release are what the project is tested with.
# constraints.txt pins the rest to the versions tested together (and spares pip a long backtrack).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# LightCluster first, then PDSO on the same run folder: they share features and k-means, and
# PDSO's report (the one printed last) sets both methods side by side.
demo: $(STAMP)
	$(BIN)/pdso-ray demo --workdir $(DEMO_DIR) --set method=lightcluster
	$(BIN)/pdso-ray demo --workdir $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) $(DEMO_DIR)
