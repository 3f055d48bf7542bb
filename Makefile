# smtpguard: `make demo` runs the whole pipeline on generated traffic; `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages: rbldnsd serves DNSBL zones (the demo's blocklist, the tests' zones), nftables
# checks enforcement sets; the tests add chromium for the console's browser tests (Playwright
# drives it; no browser download), libpcap for live capture with a BPF filter, and systemd
# (systemd-analyze verifies the deployment's units in deploy/), and pmacct and nfdump-sflow: pmacctd
# turns the shared SMTP captures into sFlow exports, sfcapd and nfdump decode them independently.
DEMO_DEB_PACKAGES = rbldnsd nftables
DEB_PACKAGES = $(DEMO_DEB_PACKAGES) chromium fonts-dejavu-core libpcap0.8 systemd pmacct nfdump nfdump-sflow
DEB_STAMP = $(VENV)/.debian-packages
DEMO_DEB_STAMP = $(VENV)/.debian-packages-demo
# install the Debian packages named in $(1) that are missing
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
endef

.PHONY: demo test test-fast bench install system-packages clean help

help:
	@echo "make demo   - set up, then run the pipeline end to end on generated traffic and print the alerts"
	@echo "make test   - set up (Python and Debian packages), then run the whole test suite"
	@echo "make bench  - run the benchmarks under bench/ (numbers go in docs/PERFORMANCE.md)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(DEB_STAMP): Makefile | $(STAMP)
	$(call apt_install,$(DEB_PACKAGES))
	touch $(DEB_STAMP)

$(DEMO_DEB_STAMP): Makefile | $(STAMP)
	$(call apt_install,$(DEMO_DEB_PACKAGES))
	touch $(DEMO_DEB_STAMP)

system-packages: $(DEB_STAMP)

demo: $(STAMP) $(DEMO_DEB_STAMP)
	$(BIN)/smtpguard demo

test: $(STAMP) $(DEB_STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP) $(DEB_STAMP)
	$(BIN)/python -m pytest -x -q

bench: $(STAMP)
	$(BIN)/python bench/bench_analyze.py --baseline
	$(BIN)/python bench/bench_netflow.py
	$(BIN)/python bench/bench_pcap.py
	$(BIN)/python bench/bench_formats.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
