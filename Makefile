# The two commands of the README: `make demo` (the main job on the embedded data) and `make test`.
PYTHON ?= python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install demo test bench clean

install:
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) -m fdlight experiment=demo

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m fdlight.bench

clean:
	rm -rf runs multirun outputs .pytest_cache
