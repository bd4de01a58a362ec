# The two commands of the README, and what they need. Everything installs into ./.venv.
#   make tutorial   set up, then run every notebook on the tiny profile (outputs in runs/tiny/)
#   make test       set up, then run the test suite (which also runs the notebooks end to end)
# Other profiles: make tutorial PROFILE=full HF_HUB_OFFLINE=0   (GPU and internet)

PYTHON ?= python3
PROFILE ?= tiny
VENV := .venv
BIN := $(VENV)/bin
# tiny never needs the model hub; offline mode makes any accidental hub call fail at once
export HF_HUB_OFFLINE ?= 1

.PHONY: setup tutorial test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

tutorial: setup
	$(BIN)/jpsdxl run --profile $(PROFILE)

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf runs/ .pytest_cache
