# plexus — everything the project needs is installed from here (Debian packages + .venv).
# Package installs run with a policy-rc.d that forbids starting services: docker.io would
# otherwise start a dockerd in the root namespace; the tests start their own, sandboxed.
#   make demo    build a small topology in a sandbox, prove it with traffic, report, tear down
#   make test    unit tests, then integration tests inside a throw-away sandbox
#   make bench   side-by-side benchmarks against the reference tools
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
DEB_PACKAGES := iproute2 nftables libnftables1 iperf3 containernetworking-plugins util-linux procps psmisc conntrack iputils-ping iptables podman runc busybox-static netavark aardvark-dns docker.io dnsperf gcc libc6-dev containerd
SANDBOX := tests/sandbox
PYTEST_ARGS ?=
# The demo and the benchmarks use the test harnesses (tests/harness), which live with the tests.
export PYTHONPATH := $(CURDIR)

.PHONY: all deps venv test unit integration demo bench lint clean install-cni

all: venv

deps: $(STAMPS)/deps
$(STAMPS)/deps: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  guard=; if [ ! -e /usr/sbin/policy-rc.d ]; then guard=1; printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; rc=$$?; \
	  [ -z "$$guard" ] || rm -f /usr/sbin/policy-rc.d; \
	  exit $$rc; \
	fi
	@touch $@

venv: $(STAMPS)/venv
$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

unit: venv
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/unit $(PYTEST_ARGS)

integration: deps venv
	@tests/rootstate > .stamps/root-before
	$(SANDBOX) $(VENV)/bin/pytest -q -p no:cacheprovider tests/integration $(PYTEST_ARGS)
	@tests/rootstate > .stamps/root-after
	@diff -u .stamps/root-before .stamps/root-after || { echo "the root namespace changed during the tests"; exit 1; }

test: deps venv lint unit integration

lint: venv
	$(VENV)/bin/ruff check src tests bench demo
	$(VENV)/bin/mypy src tests/harness demo

demo: deps venv
	$(SANDBOX) $(PY) -m demo

bench: deps venv
	$(SANDBOX) $(PY) bench/attach.py
	$(SANDBOX) $(PY) bench/attach_phases.py
	$(SANDBOX) $(PY) bench/throughput.py
	$(SANDBOX) $(PY) bench/memory.py
	$(SANDBOX) $(PY) bench/cni.py
	$(SANDBOX) $(PY) bench/podman.py
	$(SANDBOX) $(PY) bench/docker.py
	$(SANDBOX) $(PY) bench/dns.py
	$(SANDBOX) $(PY) bench/scale.py

install-cni: venv  ## the CNI plugin (plexus, plexus-ipam) into /opt/cni/bin and /usr/lib/cni
	$(PY) -m plexus.cni.install /opt/cni/bin /usr/lib/cni

clean:
	rm -rf $(VENV) $(STAMPS) .mypy_cache .ruff_cache
