# Every target sets itself up: a virtualenv under .venv with the project installed (editable).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SDK_VENV := .venv-sdk
SDK_STAMP := $(SDK_VENV)/.installed
DEPLOY_VENV := .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed

.PHONY: all demo test lint format protos sdk-venv deploy-venv deploy-check bench clean

all: test

# The repository builds four distributions: the core with the merchant app's client (.), the
# merchant zone (merchant_side/), the PCI zone (pci_side/) and the developer tools (relay/dev/).
# Development installs all four, editable.
DISTS := pyproject.toml merchant_side/pyproject.toml pci_side/pyproject.toml relay/dev/pyproject.toml

$(STAMP): $(DISTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,dev]' -e ./merchant_side -e ./pci_side -e ./relay/dev
	touch $@

# The official Cybersource SDK lives in its own virtualenv (it needs an old setuptools).
$(SDK_STAMP): scripts/sdk_requirements.txt
	rm -rf $(SDK_VENV)
	$(PYTHON) -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/python -m pip install --quiet -r scripts/sdk_requirements.txt
	touch $@

sdk-venv: $(SDK_STAMP)

# The deploy tools (kubectl with kustomize, yamllint, kubernetes-validate, checkov) live in their
# own virtualenv too: checkov's dependency tree stays out of .venv.
$(DEPLOY_STAMP): scripts/deploy_requirements.txt
	rm -rf $(DEPLOY_VENV)
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install --quiet -r scripts/deploy_requirements.txt
	touch $@

deploy-venv: $(DEPLOY_STAMP)

# Render every overlay, then yamllint, strict schema validation and checkov, offline.
deploy-check: $(DEPLOY_STAMP)
	deploy/check.sh $(DEPLOY_VENV)

demo: $(STAMP)
	$(VENV)/bin/relay demo

test: $(STAMP) $(SDK_STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/relay/pb/v1/*.proto

bench: $(STAMP)
	$(VENV)/bin/relay bench

clean:
	rm -rf $(VENV) $(SDK_VENV) .pytest_cache .mypy_cache .ruff_cache
