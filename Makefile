# Two commands do all the set-up on a fresh machine:
#   make demo   installs what is missing, compiles a torchvision ResNet-18 (prune-bn, int8), exports
#               ONNX, prints the report, writes plots, and times the result against the original
#   make test   installs what is missing and runs the test suite
# torch and torchvision are installed together, as the pair the registry builds against each other.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.racc-installed
TORCH := torch==2.14.1 torchvision==0.29.2

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/racc compile torchvision:resnet18 -p "prune-bn{ratio=0.5},int8" \
		-o out/resnet18.onnx --plots out/plots
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/racc bench torchvision:resnet18 out/resnet18.onnx

test: $(STAMP)
	$(PY) -m ruff check racc tests benchmarks examples
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -n 2 tests

bench: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m benchmarks

lint: $(STAMP)
	$(PY) -m ruff check racc tests benchmarks examples

clean:
	rm -rf $(VENV) out
