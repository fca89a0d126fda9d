# `make test` and `make run` do all the set-up on a fresh machine: a .venv with CPU torch, then the project.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# gpu-test's interpreter: the project's .venv where there is one, else $(PY) as it is (a GPU machine whose python
# already holds CUDA torch; nothing is installed)
TEST_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))

.PHONY: install test run lint gpu-test clean

$(STAMP): pyproject.toml constraints/tested.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# CPU torch where none is installed: an unpinned torch would pull several GB of CUDA wheels
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0"
	# release: llama-cpp-python compiles from source (about 8 min on 2 cores), without its multimodal part
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(BIN)/python -m pip install -q -c constraints/tested.txt -e ".[dev,release]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" tests

# the gpu-marked tests → bench/results/<card>-gpu-tests-<date>.xml (JUnit) and .md (summary); without a GPU it
# says so and writes nothing
gpu-test:
	$(TEST_PY) -m bench gpu-tests

run: $(STAMP)
	$(BIN)/python -m align.pipeline --out runs/offline

lint: $(STAMP)
	$(BIN)/ruff check model align demo tests bench
	$(BIN)/ruff format --check model align demo tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
