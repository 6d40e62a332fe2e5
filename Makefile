# Two commands do all the set-up on a fresh machine:
#   make demo   installs what is missing, compiles a torchvision ResNet-18 (prune-bn, int8), exports
#               ONNX, prints the report, writes plots, and times the result against the original
#   make test   installs what is missing and runs the test suite
# Both install from requirements.lock: every package at the version CI tested, nothing resolved.
#   make test-latest   the suite against the newest versions the registry serves (.venv-latest)
#   make lock          then rewrite requirements.lock from what make test-latest installed
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.racc-installed
LOCK := requirements.lock
LATEST := .venv-latest

.PHONY: install demo test bench lint clean test-latest lock

install: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$$(grep '^pip==' $(LOCK))"
	$(PY) -m pip install --quiet --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
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

test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
		torch torchvision -e ".[dev]"
	mkdir -p out
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable > out/requirements.latest.txt
	@echo "versions that differ from $(LOCK):"; grep -v '^#' $(LOCK) | diff - out/requirements.latest.txt || true
	RACC_UNLOCKED=1 OMP_WAIT_POLICY=PASSIVE $(LATEST)/bin/python -m pytest -n 2 tests

lock:
	test -x $(LATEST)/bin/python || { echo "run make test-latest first"; exit 1; }
	{ sed -n '/^#/p' $(LOCK); $(LATEST)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

lint: $(STAMP)
	$(PY) -m ruff check racc tests benchmarks examples

clean:
	rm -rf $(VENV) $(LATEST) out
