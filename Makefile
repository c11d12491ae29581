# The README's two commands: `make setup` (fresh Debian bookworm machine) and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
GEN := agentd/api/gen
ARGS ?=

APT_PACKAGES := python3 python3-venv python3-dev build-essential make git clang llvm libbpf-dev bpftool \
	libbpf1 iproute2 procps util-linux systemd prometheus protobuf-c-compiler libprotobuf-c-dev

.PHONY: setup apt venv proto bpf launcher test test-host test-kernel testbed-image lint clean bench-isolation install uninstall

setup: apt venv proto bpf launcher
	bash vagrant/host-setup.sh

apt:
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm $(APT_PACKAGES); \
	else echo "not root: skipping apt (need: $(APT_PACKAGES))"; fi

venv:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock -r requirements-dev.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .

proto:
	mkdir -p $(GEN)
	# The virtual include path makes the generated modules import each other as agentd.api.gen.*
	$(PY) -m grpc_tools.protoc -I$(GEN)=proto --python_out=. --grpc_python_out=. --pyi_out=. \
		$(GEN)/agentd.proto
	touch $(GEN)/__init__.py

bpf:
	$(MAKE) -C bpf

# agentd-run, the static launcher (launcher/, issue 11)
launcher:
	$(MAKE) -C launcher

test: test-host test-kernel

test-host:
	$(PY) -m pytest -m "not guest" tests $(ARGS)

test-kernel:
	bash vagrant/run-tests.sh $(ARGS)

# The isolation benchmark (issue 10, docs/benchmarks.md) in the testbed guest. The guest sees only the working
# tree, so the shared traces are staged into build/ first. BENCH_ARGS go to bench/isolation.py.
BENCH_ARGS ?= --setup A,B --runs 1
bench-isolation:
	test -d ../shared/traces/haiku || { echo "bench-isolation: ../shared/traces/haiku not found" >&2; exit 1; }
	mkdir -p build/bench-isolation/traces
	cp -r --no-preserve=mode ../shared/traces/haiku/. build/bench-isolation/traces/
	AGENTD_TESTBED_MEM=$${AGENTD_TESTBED_MEM:-6G} AGENTD_TESTBED_TIMEOUT=$${AGENTD_TESTBED_TIMEOUT:-7200} \
		AGENTD_TESTBED_EXEC='python3 bench/isolation.py $(BENCH_ARGS)' bash vagrant/run-tests.sh

testbed-image:
	bash vagrant/build-image.sh --force

# Install as a systemd service at FHS paths (systemd/install.sh; README "Running the daemon"), or remove it.
install: proto bpf
	bash systemd/install.sh $(INSTALL_ARGS)

uninstall:
	bash systemd/install.sh --uninstall $(INSTALL_ARGS)

lint:
	$(PY) -m ruff check agentd tests bench
	$(PY) -m mypy agentd

clean:
	rm -rf $(GEN) bpf/build launcher/build
