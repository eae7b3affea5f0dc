# snatgw: `make test` and `make demo` are the two commands a newcomer needs (as root).
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PKGS := iptables libnetfilter-queue-dev iperf3 iputils-ping tcpdump conntrack netcat-openbsd curl iproute2 build-essential python3-dev linux-libc-dev bind9-dnsutils
STAMP := $(VENV)/.setup-done

.PHONY: setup test unit integration lint demo bench clean lab-up lab-down

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh "$(VENV)" $(APT_PKGS)
	touch $(STAMP)

# ruff; mypy on the whole package (pyproject.toml), then strict on the pure core.
lint: setup
	$(VENV)/bin/ruff check gateway tests scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict gateway/core

# tests/unit: needs no privileges and no network namespaces (setup may need root once).
unit: setup
	$(VENV)/bin/pytest -q tests/unit

integration: setup
	$(VENV)/bin/pytest -q tests/integration

# The CI entry (.ci/run): lint, then every test, unit and integration.
test: setup lint
	$(VENV)/bin/pytest -q tests

demo: setup
	bash scripts/demo.sh

# make bench BENCH_ARGS=--quick  (or --rounds N, --duration S; scripts/bench.py --help)
BENCH_ARGS ?=
bench: setup
	$(PY) scripts/bench.py $(BENCH_ARGS)

lab-up: setup
	$(VENV)/bin/snatgw lab up

lab-down: setup
	$(VENV)/bin/snatgw lab down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
