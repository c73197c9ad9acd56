# The two commands of the README: `make demo` (the main job on the embedded data) and `make test`.
PYTHON ?= python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install demo test bench gpu-bench gpu-check clean

# strict: an editable install as a tree of links, where Hydra's plugin scan finds hydra_plugins/ (the launcher
# hydra/launcher=shared_teacher); the default editable mode hides it from that scan.
install:
	$(PYTHON) -m pip install -q -e ".[test]" --config-settings editable_mode=strict

demo: install
	$(PYTHON) -m fdlight experiment=demo

# One worker a core (at most 4; each with its share of the cores); tests that share a module's tiny run, or start
# several processes at once, are grouped onto one worker (tests/conftest.py).
test: install
	$(PYTHON) -m pytest -q -n auto --maxprocesses 4 --dist loadgroup tests

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

# The checks a GPU session runs in one call (a failing one does not stop the others): gpu-bench; the official FD step
# beside fdlight's compiled step (OFFICIAL: a folder holding the official repository's models/ and
# official_fd_step.py, outside the project); the distillation data path with each decoder (GPU decoding included);
# the run-level rate of the ViT-B step; SwinV2-G under FSDP on one GPU with activation checkpointing (step time and
# peak memory); the shared-teacher step of 3 students beside 3 separate steps (CLIP ViT-B/16 and CLIP ViT-L/14
# teachers, ViT-B/16 students; the second at 256 px, the grid of ViT-L/14 at 224).
OFFICIAL ?= .official
gpu-check: gpu-bench
	-$(PYTHON) $(OFFICIAL)/official_fd_step.py $(OFFICIAL)
	-$(PYTHON) -m fdlight.bench --compile
	-$(PYTHON) -m fdlight.bench.data --workers 8 --images 512 --decode pil,pil_draft,gpu
	-$(PYTHON) -m fdlight.bench.data --workers 0 --images 256 --decode pil,pil_draft,gpu
	-$(PYTHON) -m fdlight.bench.fit --steps 30
	-$(PYTHON) -m fdlight.bench.fit --no-step --batch 8 --steps 6 --warmup 2 student=swinv2_g teacher=esvit_swinb \
		teacher.weights=null trainer=fsdp trainer.devices=1 data.num_workers=4
	-$(PYTHON) -m fdlight.bench --compile --students 3 --steps 10
	-$(PYTHON) -m fdlight.bench --compile --students 3 --steps 10 teacher=clip_vitl student.img_size=256

clean:
	rm -rf runs multirun outputs .pytest_cache
