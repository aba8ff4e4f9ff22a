# Set-up and test commands named in the README; .ci/run calls `make install` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install data test test-slow docs quickstart summarize bench gpu-wheels clean

install: $(BIN)/.installed

$(BIN)/.installed: constraints.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[hub,sweep,dev,docs]"
	touch $@

# Fashion-MNIST, the evidence benchmark's data, from Debian's package (needs root or sudo; the
# files can also be placed in data/fashion_mnist/ by hand, see docs/guides/evidence-benchmark.md).
FMNIST := /usr/share/datasets/fashion-mnist
data:
	@test -d $(FMNIST) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
	  || echo "warning: could not install dataset-fashion-mnist; the tests on the real files will be skipped" >&2

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Default suite (fast) plus a representative few slow end-to-end tests, on TEST_WORKERS processes
# (pytest-xdist) of one thread each: most tests are small models, where a second intra-op thread buys
# little and two oversubscribed OpenMP pools on a loaded 2-core box made some tests 5x slower.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS)
test: install data
	$(PYTEST) -q -x tests
	$(PYTEST) -q -m "slow and ci" tests
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q -d site

# The documentation site (mkdocs-material, mkdocs.yml; pages under docs/), built strictly into site/
# (NO_MKDOCS_2_WARNING silences mkdocs-material's end-of-life banner, which is not a build warning)
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

test-slow: install data
	$(PYTEST) -q -m slow tests

quickstart: install
	$(BIN)/python train.py experiment=quickstart method=magnitude budget=0.9

# Benchmarks (README "Performance"): make bench; make bench BENCH_ARGS="--device cuda --amp bf16"
BENCH_ARGS ?= --quick
bench: install
	$(BIN)/python scripts/bench.py $(BENCH_ARGS) --out bench.json

# What scripts/device/gpu_check.sh installs on a lent GPU machine, which cannot download (pinned versions)
gpu-wheels: install
	$(BIN)/pip download -q --no-deps -d .gpu_wheels $$(grep -E '^(hydra-core|omegaconf|antlr4-python3-runtime|torch-pruning)==' constraints.txt)

clean:
	rm -rf $(VENV) .pytest_cache

# Summarise a sweep directory: make summarize SWEEP=outputs/sweeps/<id>
summarize: install
	@test -n "$(SWEEP)" || { echo "error: set SWEEP=outputs/sweeps/<id>" >&2; exit 2; }
	$(BIN)/python scripts/summarize.py $(SWEEP)
