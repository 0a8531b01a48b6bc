# nexus-bus: every install step lives here, so a fresh clone needs only `make up` / `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test install lint typecheck bench schemas clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,test]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/nexus-bus up

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check nexus_bus handlers schemas tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy nexus_bus handlers schemas

bench: $(STAMP)
	$(BIN)/python -m benchmarks

schemas: $(STAMP)
	$(BIN)/nexus-bus schemas export

clean:
	rm -rf $(VENV) .nexus build *.egg-info .pytest_cache .mypy_cache .ruff_cache
