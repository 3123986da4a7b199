# Two commands a new user needs (see README.md):
#   make demo   # data preparation + the three training stages on an embedded local Ray (tiny models,
#               # synthetic corpus on 127.0.0.1), then one answer from the final model
#   make test   # lint + the whole test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[data,train,dev]'
	touch $@

demo: install
	$(PY) -m pipelines.prepare --config pipelines/configs/demo.yaml
	$(PY) -m jobs.train --stage all --data runs/demo/shards --sft-data runs/demo/sft_shards \
		--init-from tiny --profile cpu --output-dir runs/demo/train
	$(PY) -m breen.generate --model runs/demo/train/stage3/export --image runs/demo/synthetic/images/00001.jpg \
		--prompt "What is in the picture?" --max-new-tokens 16

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest
