# The two commands of the README's quick start are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install install-test peers lint bench clean

# torch goes in first, pinned, so nothing pulls the multi-GB CUDA build.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed
install-test: $(BIN)/.installed-test

# Debian peers used by the tests: DCMTK, dicom3tools, Orthanc (+gdcm, dicomweb), pixelmed, OpenJPH.
peers:
	bash deploy/install-peers.sh

demo: install
	$(BIN)/anatomix-node demo

# Formatter, linter, type checker and the package layering ([tool.ruff], [tool.mypy] and
# [tool.importlinter] in pyproject.toml); `make test` runs it before the tests.
lint: install-test
	$(BIN)/ruff format --check
	$(BIN)/ruff check
	$(BIN)/mypy
	$(BIN)/lint-imports

# Two passes (tests/conftest.py): the suite on $(TEST_WORKERS) xdist workers, one test file (or group of files)
# per worker at a time, then the `solo` tests alone. Both always run; the target fails if either failed.
TEST_WORKERS ?= 3
test: install-test peers lint
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 -m "not solo"; parallel=$$?; \
	$(BIN)/pytest -m solo; solo=$$?; \
	test $$parallel -eq 0 -a $$solo -eq 0

bench: install-test peers
	$(BIN)/python benchmarks/writer.py
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/e2e.py

clean:
	rm -rf $(VENV) var test-output
