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
DEB_PACKAGES := iproute2 nftables libnftables1 iperf3 ethtool containernetworking-plugins util-linux procps psmisc conntrack iputils-ping iptables podman runc busybox-static netavark aardvark-dns docker.io dnsperf gcc libc6-dev containerd etcd-server etcd-client prometheus chromium fonts-dejavu-core
SANDBOX := tests/sandbox
PYTEST_ARGS ?=
# The demo and the benchmarks use the test harnesses (tests/harness), which live with the tests.
export PYTHONPATH := $(CURDIR)

.PHONY: all deps venv test unit integration demo bench lint clean install-cni

all: venv

deps: $(STAMPS)/deps
# apt's progress (APT::Status-Fd) reduced to a line per quarter downloaded and per package set up;
# the rest of its output is kept out of sight unless something fails.
APT_PROGRESS = awk -F: '/^dlstatus/ && $$3 >= d { printf "  downloading %3d%%\n", $$3; d = $$3 + 25; fflush() } \
  /^pmstatus:/ && (i = index($$0, ":Installed ")) { pct = substr($$0, 1, i - 1); sub(/.*:/, "", pct); \
    printf "  [%3d%%] installed %s\n", pct, substr($$0, i + 11); fflush() }'
$(STAMPS)/deps: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "updating the package lists (apt-get update)"; \
	  apt-get update -qq || exit 1; \
	  total=$$(apt-get -s install --no-install-recommends $$missing | grep -c '^Inst '); \
	  echo "installing $$(echo $$missing | wc -w) Debian packages ($$total with their dependencies):" $$missing; \
	  guard=; if [ ! -e /usr/sbin/policy-rc.d ]; then guard=1; printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi; \
	  set -o pipefail; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o APT::Status-Fd=3 $$missing \
	    3>&1 >$(STAMPS)/apt.log 2>&1 | $(APT_PROGRESS); rc=$$?; \
	  [ -z "$$guard" ] || rm -f /usr/sbin/policy-rc.d; \
	  [ $$rc = 0 ] || { tail -n 30 $(STAMPS)/apt.log; exit $$rc; }; \
	fi
	@touch $@

venv: $(STAMPS)/venv
# The packages pyproject.toml names (plexus's and the dev tools'); pip shows as one line per
# package it collects (dependencies included), the rest of its output goes to a log.
PY_REQUIREMENTS = $(PY) -c 'import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
  print(" ".join(re.split(r"[<>=!~ ;\[]", r)[0] for r in p["dependencies"] + p["optional-dependencies"]["dev"]))'
$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	@test -x $(PY) || { echo "creating the virtualenv $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@set -o pipefail; log=$(STAMPS)/pip.log; wanted=$$($(PY_REQUIREMENTS)); \
	echo "installing plexus (editable) and $$(echo $$wanted | wc -w) Python packages into $(VENV), with their dependencies:" $$wanted; \
	$(PY) -m pip install --upgrade pip >$$log 2>&1 || { tail -n 30 $$log; exit 1; }; \
	$(PY) -m pip install -e '.[dev]' 2>&1 | tee -a $$log | awk '/^Collecting / { sub(/[<>=!~;[].*/, "", $$2); printf "  collecting %s\n", $$2; fflush() } \
	  /^Processing .*\.whl/ { n = split($$2, path, "/"); split(path[n], w, "-"); printf "  collecting %s\n", w[1]; fflush() } \
	  /^Successfully installed/ { printf "  installed %d packages\n", NF - 2; fflush() }' \
	  || { tail -n 30 $$log; exit 1; }
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
	$(SANDBOX) $(PY) bench/overlay.py
	$(SANDBOX) $(PY) bench/overlay_hosts.py
	$(SANDBOX) $(PY) bench/store.py
	$(SANDBOX) $(PY) bench/memory.py
	$(SANDBOX) $(PY) bench/cni.py
	$(SANDBOX) $(PY) bench/podman.py
	$(SANDBOX) $(PY) bench/docker.py
	$(SANDBOX) $(PY) bench/dns.py
	$(SANDBOX) $(PY) bench/dns_update.py
	$(SANDBOX) $(PY) bench/loop_stall.py
	$(SANDBOX) $(PY) bench/scale.py
	$(SANDBOX) $(PY) bench/cluster.py
	$(SANDBOX) $(PY) bench/policy.py
	$(SANDBOX) $(PY) bench/metrics_scrape.py
	$(SANDBOX) $(PY) bench/services.py
	$(SANDBOX) $(PY) bench/flows.py
	$(SANDBOX) $(PY) bench/verify.py

install-cni: venv  ## the CNI plugin (plexus, plexus-ipam) into /opt/cni/bin and /usr/lib/cni
	$(PY) -m plexus.cni.install /opt/cni/bin /usr/lib/cni

clean:
	rm -rf $(VENV) $(STAMPS) .mypy_cache .ruff_cache
