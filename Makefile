# Two commands do everything on a fresh machine:
#   make serve   set up .venv and run `tandem serve` on the built-in default models
#   make test    set up .venv and run the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve test bench lint install coverage chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The console's browser tests (tests/browser) drive Debian's chromium through Playwright; no
# browser is downloaded by Playwright itself.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; }

# tiny-llm may also hot-load adapters that local pipeline runs wrote into their artifact store, so
# `tandem pipeline run examples/pipelines/lora.py` deploys into this server as the README shows.
TANDEM_PIPELINE_HOME ?= $(CURDIR)/.tandem/pipelines
serve: $(STAMP)
	mkdir -p '$(TANDEM_PIPELINE_HOME)/artifacts'
	$(VENV)/bin/tandem serve --adapter-dir '$(TANDEM_PIPELINE_HOME)/artifacts'

test: $(STAMP) chromium
	$(VENV)/bin/ruff check tandem tests benchmarks
	$(VENV)/bin/mypy tandem
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/serving.py --markdown bench-out/serving.md --json bench-out/serving.json
	$(PY) benchmarks/lora.py --markdown bench-out/lora.md --json bench-out/lora.json

coverage: $(STAMP) chromium
	rm -f .coverage .coverage.*
	HF_HUB_OFFLINE=1 $(VENV)/bin/coverage run -m pytest -q
	$(VENV)/bin/coverage combine -q
	$(VENV)/bin/coverage report --sort=cover
