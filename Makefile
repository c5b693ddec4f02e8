# Two commands: `make run` (the default job) and `make test` (the whole suite).
# Both create .venv and install everything on first use.
# GPU users: make run TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
export RAY_AUTH_MODE ?= disabled

.PHONY: run test install train serve bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so the CPU build (or the one TORCH_SPEC names) is the one that stays
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m jobs.generate $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

train: install
	$(PY) -m jobs.train jobs/configs/train_digits.yaml

serve: install
	$(PY) -m jobs.serve $(ARGS)

bench: install
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"

clean:
	rm -rf outputs .pytest_cache
