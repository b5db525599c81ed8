# The two commands of the README:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of PyTorch; pin it so pip never pulls a multi-GB CUDA build by surprise.
TORCH_SPEC ?= torch==2.13.0
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[examples,samplers,dashboard,plots,s3,mlflow,tensorboard,dev]"
	touch $@

setup: $(VENV)/.installed

# The whole shape on the embedded default (SQLite, no server): a pool of two workers waits,
# the coordinator creates the study from config.yaml, the workers run it, inspect summarizes.
demo: setup
	@rm -f demo.db demo.db-wal demo.db-shm
	@export HPO_STORAGE=sqlite:///demo.db; \
	  hpo-worker --processes 2 --idle-exit 5 & \
	  hpo-coordinator create config.yaml && wait && hpo-inspect linear-regression --top 5
	@echo; echo "The study is in demo.db. To look further:"; \
	  echo "  . .venv/bin/activate && export HPO_STORAGE=sqlite:///demo.db"; \
	  echo "  hpo-inspect linear-regression --plot plots/"

test: setup
	@scripts/ensure-postgres
	$(PY) -m pytest

# The edit-run loop: no database server, no Docker engine (tests/unit).
test-fast: setup
	$(PY) -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check hpo_framework workers experiments tests bench
	$(VENV)/bin/mypy

bench: setup
	@scripts/ensure-postgres
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) *.db *.db-wal *.db-shm .pytest_cache
