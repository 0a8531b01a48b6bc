# nexus-bus: every install step lives here, so a fresh clone needs only `make up` / `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
TORCH_VERSION ?= 2.13.0

.PHONY: up test test-compose install lint typecheck bench schemas clean system-deps

# One install at a time: two makes at once (two `make up` in a fresh clone) would run venv and
# pip on one .venv together ("pip: No such file or directory"). A stamp to make is made by a
# make run under flock(1) on .venv.lock (util-linux; without flock, unlocked as before), which
# finds it up to date when the other make made it meanwhile. An up-to-date stamp runs no recipe,
# so it takes no lock.
LOCKED = $(if $(shell command -v flock),flock $(VENV).lock) $(MAKE) --no-print-directory INSTALL_LOCKED=1

# What `make up` runs on: the package and its runtime extras, no test tools (with them, every
# process would also load aiohttp, which nats-py imports when it is installed: 9 MB each).
# torch first, pinned: pip takes its CPU build (about 750 MB) from this machine's disk; left to
# the ai-local extra's range alone it would pull a CUDA build of several GB (docs/ai.md).
$(STAMP): pyproject.toml Makefile
ifdef INSTALL_LOCKED
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[embedded,ai-local,ai-graph]'
	touch $(STAMP)
else
	$(LOCKED) $@
endif

# Plus the test tools, for the suite, the checks and the benchmarks.
$(TEST_STAMP): $(STAMP)
ifdef INSTALL_LOCKED
	$(BIN)/python -m pip install --quiet -e '.[embedded,test,ai-local,ai-graph]'
	$(MAKE) --no-print-directory $(COMPOSE_SPEC)
	touch $(TEST_STAMP)
else
	$(LOCKED) $@
endif

# The Compose specification's JSON schema, which the compose checks validate against: it ships
# inside the docker-compose 1.29.2 wheel (only the schema is taken; nothing is installed).
COMPOSE_SPEC := $(VENV)/share/compose-spec/compose_spec.json
$(COMPOSE_SPEC):
	rm -rf build/compose-spec && mkdir -p build/compose-spec $(dir $(COMPOSE_SPEC))
	$(BIN)/python -m pip download --quiet --no-deps --dest build/compose-spec docker-compose==1.29.2
	$(BIN)/python -c "import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read('compose/config/compose_spec.json'))" build/compose-spec/docker_compose-1.29.2-py2.py3-none-any.whl > $@

install: $(TEST_STAMP)

# From Debian's packages, when absent: NGINX (tests/e2e), wrk (bench_http's load generator), and
# Prometheus, Alertmanager, redis_exporter and node_exporter (tests/integration/test_monitoring).
DEBIAN_DEPS := nginx wrk prometheus prometheus-alertmanager prometheus-redis-exporter prometheus-node-exporter
system-deps:
	@missing=""; for p in $(DEBIAN_DEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; fi

up: $(STAMP)
	$(BIN)/nexus-bus up

test: $(TEST_STAMP) system-deps
	$(BIN)/python -m pytest -q

# The compose stack for real (tests/e2e/test_compose_stack.py, docs/monitoring.md): needs a Docker
# engine, Docker Compose >= 2.24.4 and registry access. Out of `make test` because it takes
# minutes (about 2 GB of images the first time, then the image build and a 3-node JetStream
# cluster); there it skips, saying so.
test-compose: $(TEST_STAMP)
	NEXUS_TEST_COMPOSE=1 $(BIN)/python -m pytest tests/e2e/test_compose_stack.py -rs

lint: $(TEST_STAMP)
	$(BIN)/ruff check nexus_bus handlers schemas tests benchmarks
	$(BIN)/lint-imports --no-cache

# handlers/ and schemas/ install as nexus_bus.handlers / nexus_bus.schemas (package-dir), which
# mypy cannot follow: check a link tree laid out as the installed package.
typecheck: $(TEST_STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck
	cp -rs "$(CURDIR)/nexus_bus" build/typecheck/
	ln -s "$(CURDIR)/handlers" build/typecheck/nexus_bus/handlers
	ln -s "$(CURDIR)/schemas" build/typecheck/nexus_bus/schemas
	cd build/typecheck && "$(CURDIR)/$(BIN)/mypy" --config-file "$(CURDIR)/pyproject.toml" -p nexus_bus

bench: $(TEST_STAMP) system-deps
	$(BIN)/python -m benchmarks

schemas: $(STAMP)
	$(BIN)/nexus-bus schemas export

clean:
	rm -rf $(VENV) $(VENV).lock .nexus build *.egg-info .pytest_cache .mypy_cache .ruff_cache
