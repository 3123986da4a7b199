# Two commands a new user needs (see README.md):
#   make demo   # data preparation + the three training stages on an embedded local Ray (tiny models,
#               # synthetic corpus on 127.0.0.1), then one answer from the final model and one score of
#               # the built-in lmms-eval task
#   make test   # lint + the whole test suite (what .ci/run calls)
# Environment (README "Environment"): `make install` installs exactly requirements.lock into .venv
# (re-created when it was built from another lock) and checks it; `make lock` regenerates the lock.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
LOCK := requirements.lock
GPU_LOCK := requirements-gpu.lock
# uv (which installs the lock) has its own index settings; follow pip's index when only pip's is set.
ifdef PIP_INDEX_URL
export UV_DEFAULT_INDEX ?= $(PIP_INDEX_URL)
endif
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install install-gpu lock demo test bench

install:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "$(PYTHON) is Python < 3.11; the lock needs 3.11+ (e.g. make PYTHON=python3.12 ...)"; exit 1; }
	@if $(PYTHON) -m breen.envlock stale --venv $(VENV) --lock $(LOCK); then \
	  echo "== $(VENV): missing or installed from another lock; creating it from $(LOCK)"; \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV) \
	  && $(PYTHON) -m breen.envlock entry uv --lock $(LOCK) > $(VENV)/uv-requirement.txt \
	  && $(VENV)/bin/pip install -qq --no-deps --require-hashes -r $(VENV)/uv-requirement.txt \
	  && $(UV) pip sync -q --python $(PY) --require-hashes $(LOCK) \
	  && $(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e . \
	  && $(PY) -m breen.envlock stamp --lock $(LOCK); \
	fi
	@$(PY) -m breen.envlock check --lock $(LOCK)

# On a CUDA machine with the CUDA toolkit (flash-attn builds from source against the locked torch).
install-gpu: install
	$(UV) pip install --python $(PY) --no-deps --no-build-isolation --require-hashes -r $(GPU_LOCK)
	$(PY) -m breen.envlock stamp --lock $(LOCK) --lock $(GPU_LOCK)
	$(PY) -m breen.envlock check --lock $(LOCK)

# Regenerate both lock files from the ranges in pyproject.toml (then: make install && make test, commit).
# uv keeps the current pins where they still fit: UPGRADE="--upgrade-package NAME" (or "--upgrade") moves them.
# The gpu lock holds the `gpu` extra alone (--no-deps: flash-attn needs only torch and einops, both in
# the main lock, whose versions constrain it).
UV_COMPILE = $(UV) pip compile --universal --python-version 3.11 --generate-hashes --quiet $(UPGRADE)
lock: install
	$(UV_COMPILE) pyproject.toml --extra data --extra train --extra eval --extra dev -o $(LOCK)
	$(PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]))' \
	  | $(UV_COMPILE) - --no-deps -c $(LOCK) -o $(GPU_LOCK)

demo: install
	$(PY) -m pipelines.prepare --config pipelines/configs/demo.yaml
	$(PY) -m jobs.train --stage all --config jobs/configs/demo.yaml
	$(PY) -m breen.generate --model runs/demo/train/stage3/export --image runs/demo/synthetic/images/00001.jpg \
		--prompt "What is in the picture?" --max-new-tokens 16
	$(PY) -m jobs.eval --model runs/demo/train/stage3/export --tasks breen_shapes

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest
