# Every target sets itself up on a fresh Debian machine (as root): apt packages, a venv, pip.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
APT_PACKAGES := nftables iproute2 ethtool socat conntrack coturn procps curl miniupnpd-nftables iputils-ping redis-server tcpdump
PYTEST_ARGS ?=

.PHONY: setup apt venv test test-unit lint demo bench matrix clean lab-down swarm-demo

setup: apt venv

# Debian packages the lab, the benchmarks and the coturn interop test need. Skipped when all are present.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  else echo "warning: missing Debian packages:$$missing (run as root on Debian to install them)"; fi; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install -q -e '.[test,lint]'

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check tcppunch tests scripts examples
	$(BIN)/mypy --strict tcppunch

demo: setup
	$(BIN)/python scripts/demo.py

bench: setup
	$(BIN)/python scripts/bench_all.py

# A seeder and five leechers, each behind its own NAT type in the lab, share a 20 MB file (examples/swarm).
swarm-demo: setup
	$(BIN)/python -m examples.swarm demo

lab-down: venv
	$(BIN)/tcppunch lab down --all

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
