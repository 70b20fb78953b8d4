# The two commands (README): `make run` sets up .venv and starts a node on the
# embedded default; `make test` sets up .venv and runs every test.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
# setup.py's build requirements, for the debug build it runs outside pip.
BUILD_TOOLS := $(VENV)/.build-tools
DEBUG_LIB := build/debug/lib
NODE_PEERS := bench/peers/node/node_modules/.installed
JS_DEPS := clients/js/node_modules/.installed
# Debian's chromium and its driver, for tests/test_browser.py (rule below).
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
SOURCES := pyproject.toml setup.py $(wildcard pyx/*/*.pyx pyx/*/*.pxd pyx/*/*.pxi pyx/*/*.h fanout/*.pxd fanout/protocol/*.proto)

.PHONY: run cluster test test-debug build debug clean perf-check bench bench-micro fuzz soak node-peers js-deps browser ssl-headers

run: $(RUN_STAMP)
	$(VENV)/bin/fanout node

# A local cluster to try (docs/cluster.md): nats-server, a router and three
# nodes; it prints their addresses, Ctrl-C stops them all.
cluster: $(STAMP)
	$(VENV)/bin/fanout cluster

test: $(STAMP) test-debug $(NODE_PEERS) $(JS_DEPS) $(BROWSER)
	$(PY) -m pytest

# The core's tests against a debug build (C asserts on, bounds checks; see
# setup.py), so that CI runs the asserts. The debug build is a copy of the
# package in $(DEBUG_LIB); running from there puts it first on sys.path,
# ahead of the release build in ./fanout (the editable install), which it
# leaves alone. setup.py rebuilds only what changed since the last run.
test-debug: $(STAMP) $(BUILD_TOOLS) | ssl-headers
	FANOUT_DEBUG=1 $(PY) setup.py -q build --build-base build/debug --build-lib $(DEBUG_LIB)
	cd $(DEBUG_LIB) && $(CURDIR)/$(PY) -c 'import fanout._core as c; print("core:", c.__file__); \
	    assert c.__file__.startswith("$(CURDIR)/$(DEBUG_LIB)/"), "not the debug build"; \
	    assert b"__assert_fail" in open(c.__file__, "rb").read(), "no C asserts in it"'
	cd $(DEBUG_LIB) && $(CURDIR)/$(PY) -m pytest --rootdir $(CURDIR) -p no:cacheprovider \
	    $(CURDIR)/tests/test_core.py $(CURDIR)/tests/test_write_rounds.py \
	    $(CURDIR)/tests/test_websocket.py $(CURDIR)/tests/test_tls_core.py -k "not node"

build: $(STAMP)

# The core links OpenSSL (its TLS layer, pyx/core/tls.pyx): the headers come
# from Debian's libssl-dev, installed when missing (CI runs as root).
ssl-headers:
	@test -f /usr/include/openssl/ssl.h || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev; }

# Debug build: Cython linetrace/profile hooks, bounds checks, -O0 -g,
# FANOUT_DEBUG C macro, and HTML annotation in build/cython-debug/.
debug: $(PY)
	FANOUT_DEBUG=1 FANOUT_ANNOTATE=1 $(PY) -m pip install -q -e '.[test,bench,tools]'
	rm -f $(STAMP) $(RUN_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) $(SOURCES) | ssl-headers
	@# The distribution was called "fanout" before (a name PyPI gives another
	@# project): drop that install first, so only fanout-im owns bin/fanout.
	$(PY) -m pip uninstall -q -y fanout 2>/dev/null || true
	$(PY) -m pip install -q -e '.[test,bench,cluster,tools]'
	touch $(STAMP) $(RUN_STAMP)

# `make run` alone: what a node needs and the tools (not the test and bench
# extras); `make test` adds those to the same .venv.
$(RUN_STAMP): $(PY) $(SOURCES) | ssl-headers
	$(PY) -m pip uninstall -q -y fanout 2>/dev/null || true
	$(PY) -m pip install -q -e '.[tools]'
	touch $(RUN_STAMP)

# What pip installs in its isolated build env: pyproject.toml's
# [build-system] requires.
$(BUILD_TOOLS): $(PY) pyproject.toml
	$(PY) -m pip install -q $$($(PY) -c 'import sys; \
	    toml = __import__("tomllib" if sys.version_info >= (3, 11) else "tomli"); \
	    print(*toml.load(open("pyproject.toml", "rb"))["build-system"]["requires"])')
	touch $(BUILD_TOOLS)

# The Node peers of the scenarios (bench/peers/node/: uWebSockets.js and ws,
# on the machine's Node.js), installed from package-lock.json; again only
# when the lock changes. `make test` needs them for tests/test_bench_smoke.py.
node-peers: $(NODE_PEERS)
$(NODE_PEERS): bench/peers/node/package.json bench/peers/node/package-lock.json
	cd bench/peers/node && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_PEERS)

# The JavaScript client SDK's dependencies (clients/js: protobufjs; for its
# tests and builds ws, esbuild, protobufjs-cli), from its package-lock.json.
# `make test` needs them for tests/test_js_sdk.py.
js-deps: $(JS_DEPS)
$(JS_DEPS): clients/js/package.json clients/js/package-lock.json
	cd clients/js && npm ci --no-audit --no-fund --loglevel=error
	touch $(JS_DEPS)

# The browser tests' browser (tests/test_browser.py): Debian's chromium and
# its chromedriver, from apt when either is missing (CI runs as root on a
# fresh Debian machine; elsewhere through sudo). Nothing is downloaded at
# test time: the tests name both paths.
browser: $(BROWSER)
$(BROWSER) &:
	$$([ "$$(id -u)" = 0 ] || echo sudo) sh -c 'export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -q && apt-get install -y -q chromium chromium-driver'

# Benchmarks (bench/README.md). The release build in $(STAMP) already has
# the `bench` extra (pyperf, pytest-benchmark).
BENCH_OUT ?= build/pyperf.json

# CI's performance regression gate (.ci/run): a short interleaved run whose
# ratios must stay above bench/perf_thresholds.json. Under a minute.
# PERF_CHECK_ARGS: e.g. "--json build/perf-check.json" or "--repeat 25".
PERF_CHECK_ARGS ?=
perf-check: $(STAMP)
	$(PY) bench/perf_check.py $(PERF_CHECK_ARGS)

# The full pyperf suite; results in $(BENCH_OUT) (read it with
# `$(PY) -m pyperf show` or compare two with `compare_to`).
bench: $(STAMP)
	mkdir -p $(dir $(BENCH_OUT))
	rm -f $(BENCH_OUT)
	$(PY) bench/pyperf_suite.py -o $(BENCH_OUT)

# pytest-benchmark of the same hot functions (opt-in: not collected by `make test`).
bench-micro: $(STAMP)
	$(PY) -m pytest bench/test_micro.py --benchmark-only

# Issue 8's tools (bench/README.md): the fuzzer and the soak scenario.
FUZZ_ARGS ?= --inputs 1000000 --seed 1
fuzz: $(STAMP)
	$(PY) bench/fuzz.py $(FUZZ_ARGS)

SOAK_MINUTES ?= 30
soak: $(STAMP)
	flock /tmp/fanout-bench.lock $(PY) -m bench.scenarios soak --minutes $(SOAK_MINUTES)

clean:
	rm -rf build $(VENV) *.egg-info fanout/*.so fanout/protocol/*_pb2.py* .pytest_cache \
	    bench/peers/node/node_modules
