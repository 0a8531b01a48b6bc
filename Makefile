# nexus-bus: every install step lives here, so a fresh clone needs only `make up` / `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test install lint typecheck bench schemas clean system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,test]'
	touch $(STAMP)

install: $(STAMP)

# NGINX (tests/e2e) and wrk (bench_http's load generator) from Debian's packages, when absent.
system-deps:
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nginx wrk)
	command -v wrk >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk)

up: $(STAMP)
	$(BIN)/nexus-bus up

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check nexus_bus handlers schemas tests benchmarks

# handlers/ and schemas/ install as nexus_bus.handlers / nexus_bus.schemas (package-dir), which
# mypy cannot follow: check a link tree laid out as the installed package.
typecheck: $(STAMP)
	rm -rf build/typecheck && mkdir -p build/typecheck
	cp -rs "$(CURDIR)/nexus_bus" build/typecheck/
	ln -s "$(CURDIR)/handlers" build/typecheck/nexus_bus/handlers
	ln -s "$(CURDIR)/schemas" build/typecheck/nexus_bus/schemas
	cd build/typecheck && "$(CURDIR)/$(BIN)/mypy" --config-file "$(CURDIR)/pyproject.toml" -p nexus_bus

bench: $(STAMP) system-deps
	$(BIN)/python -m benchmarks

schemas: $(STAMP)
	$(BIN)/nexus-bus schemas export

clean:
	rm -rf $(VENV) .nexus build *.egg-info .pytest_cache .mypy_cache .ruff_cache
