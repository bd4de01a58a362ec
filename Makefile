# The two commands of the README, and what they need. Everything installs into ./.venv, pinned by requirements.lock.
#   make tutorial   set up, then run every notebook on the tiny profile (outputs in runs/tiny/)
#   make test       set up, then run every test, each notebook executed once (CI runs this)
#   make test-fast  every test but the notebooks' execution and the slow launchers: the inner loop
#   make rehearse   the notebooks on `full` and `colab` rehearsed on this CPU, offline, against a stand-in hub (CI too)
#   make repository URL=https://github.com/<you>/<name>   a fork's address in the badges, clone cells, docs
#   make lock       re-resolve pyproject.toml's ranges into requirements.lock (then read the diff, run make test)
# Other profiles: make tutorial PROFILE=full HF_HUB_OFFLINE=0   (GPU and internet)

PYTHON ?= python3
PROFILE ?= tiny
VENV := .venv
BIN := $(VENV)/bin
PIP_VERSION := 26.3
UV_VERSION := 0.13.9
# uv reads only its own configuration: hand it the extra package sources pip is configured with, if any (a machine
# may mirror big wheels such as torch's on local disk); every version is pinned by requirements.lock, so taking the
# best match across the sources cannot change what is installed
UV_SOURCES = $(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null | tr ' ' '\n' | sed 's/^/--extra-index-url /')
# tiny never needs the model hub; offline mode makes any accidental hub call fail at once
export HF_HUB_OFFLINE ?= 1

.PHONY: setup tutorial test test-fast rehearse lock clean repository

setup: $(VENV)/.installed

# uv, not pip, for the ~180 packages: it unpacks them in parallel, 68 s instead of 98 s on 2 cores (docs/results.md).
# --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set, nothing else ever writes the .pyc files
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==$(PIP_VERSION) uv==$(UV_VERSION)
	VIRTUAL_ENV=$(VENV) $(BIN)/uv pip install --quiet --compile-bytecode --index-strategy unsafe-best-match \
	  $(UV_SOURCES) -c requirements.lock -e ".[dev]"
	touch $@

tutorial: setup
	$(BIN)/jpsdxl run --profile $(PROFILE)

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not notebooks and not slow"

rehearse: setup
	$(BIN)/jpsdxl rehearse

# a fork: point the Colab badges, clone cells and docs at its own address (pyproject.toml holds the one address)
repository:
	$(PYTHON) -m jpsdxl.notebook.colab $(URL)

lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet pip==$(PIP_VERSION)
	.lock-venv/bin/python -m pip install --quiet -e ".[dev]"
	head -4 requirements.lock > requirements.lock.new
	.lock-venv/bin/python -m pip freeze --exclude-editable >> requirements.lock.new
	# the gpu extra is not installed here (no CUDA): resolve it without installing, and pin what it would add
	.lock-venv/bin/python -m pip install --quiet --dry-run --report .lock-venv/gpu.json ".[gpu]"
	echo "# the gpu extra (not installed by CI; Colab installs it): resolved by pip install --dry-run" >> requirements.lock.new
	.lock-venv/bin/python -c "import json; r = json.load(open('.lock-venv/gpu.json')); \
	  print(*sorted(f\"{i['metadata']['name']}=={i['metadata']['version']}\" for i in r['install'] \
	  if i['metadata']['name'] != 'jpsdxl'), sep='\n')" >> requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf runs/ .pytest_cache
