# The two commands of the README: `make demo` (the main job on the embedded data) and `make test`.
PYTHON ?= python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install demo test bench gpu-bench clean

install:
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) -m fdlight experiment=demo

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m fdlight.bench

# On a GPU machine with fdlight installed: the Triton kernel's checks on the GPU (bf16 included), then both training
# steps, compiled, with each kernel choice (a failing variant does not stop the others).
gpu-bench:
	-$(PYTHON) -m pytest -q tests/test_biased_attention.py
	-$(PYTHON) -m fdlight.bench --compile
	-$(PYTHON) -m fdlight.bench --compile trainer.attention=triton
	-$(PYTHON) -m fdlight.bench --compile trainer.attention=triton drop_path.mode=subset
	-$(PYTHON) -m fdlight.bench.segment --compile
	-$(PYTHON) -m fdlight.bench.segment --compile --attention triton

clean:
	rm -rf runs multirun outputs .pytest_cache
