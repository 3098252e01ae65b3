# Two commands a fresh machine needs: `make demo` and `make test`. Both build .venv/ from the pinned lock
# files first (once; again only when pyproject.toml or a lock file changes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIN := -c requirements/lock.txt -c requirements/test-lock.txt

.PHONY: env demo test test-fast lint bench clean gpu-carry

env: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt requirements/test-lock.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(PIN) torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check $(PIN) -e '.[test]'
	touch $@

demo: $(STAMP)
	WANDB_SILENT=true $(BIN)/genzoo fit -c configs/vae_digits.yaml

# Two pytest-xdist workers: most tests are one single-threaded process, so the suite takes about half the time
# on 2 cores (the multi-process tests start their own processes either way). TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not ddp"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/vae_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# For a session lent a GPU machine (the device tool): what tests/gpu/device_check.sh needs there, into .gpu/.
gpu-carry:
	rm -rf .gpu && mkdir -p .gpu/whl && cp -r ../shared/data/mnist .gpu/mnist
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .gpu/whl -r tests/gpu/wheels.txt
