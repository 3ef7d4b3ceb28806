# Carvana pipeline. `make all` = venv + demo data (if none) + prepare train oof predict submit.
# Overrides: CONFIG=configs/x.yaml, RAW=path/to/kaggle/data, FOLD=k, ARGS="key=value ...".
SHELL := /bin/bash
PY     := .venv/bin/python
CONFIG ?= configs/default.yaml
RAW    ?=
FOLD   ?=
SHARD  ?=
SUB    ?=
MASKS  ?=
TEST_DIR ?= test
ARGS   ?=
NPROC  ?= 2
BENCH  ?=

# Every stage sees the same config: the YAML, then RAW/FOLD/SHARD switches, then ARGS.
# FOLD=k trains fold k and predicts with it alone (so `make all FOLD=0` is one fold end to end).
STAGE_ARGS := --config $(CONFIG) $(if $(RAW),data.raw=$(RAW)) $(if $(FOLD),train.fold=$(FOLD) predict.folds=$(FOLD)) \
              $(if $(SHARD),predict.shard=$(SHARD)) $(ARGS)
export NO_ALBUMENTATIONS_UPDATE := 1
# Not HF_HUB_OFFLINE: encoder_weights=imagenet downloads from the hub for users who are online.
# Tests and benchmarks never need the hub and set it themselves.

.PHONY: all venv demo-data prepare train train-ddp oof predict submit validate score test bench clean-cache
# The stages depend on each other's files: never run them side by side, even under `make -j`.
.NOTPARALLEL:

# demo-data generates the embedded set only where data.raw holds no dataset yet (it never overwrites).
all: venv
	@if [ -z "$(RAW)" ]; then $(MAKE) --no-print-directory demo-data; fi
	$(MAKE) --no-print-directory prepare train oof predict submit

# The venv is rebuilt only when requirements.txt changes.
venv: .venv/.installed
.venv/.installed: requirements.txt
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

demo-data: venv
	$(PY) scripts/synth.py $(STAGE_ARGS)

prepare: venv
	$(PY) scripts/prepare.py $(STAGE_ARGS)

train: venv
	$(PY) scripts/train.py $(STAGE_ARGS)

# The same training under torchrun/DistributedDataParallel (gloo on CPU, nccl on CUDA).
train-ddp: venv
	.venv/bin/torchrun --standalone --nproc_per_node $(NPROC) -m pipeline train $(STAGE_ARGS)

oof: venv
	$(PY) scripts/oof.py $(STAGE_ARGS)

predict: venv
	$(PY) scripts/predict.py $(STAGE_ARGS)

submit: venv
	$(PY) scripts/submit.py $(STAGE_ARGS)

validate: venv
	$(PY) scripts/validate.py $(SUB) $(if $(RAW),--sample $(RAW)/sample_submission.csv --test-dir $(TEST_DIR))

score: venv
	$(PY) scripts/score.py $(SUB) $(MASKS)

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench: venv
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py $(BENCH)

clean-cache:
	rm -rf data/cache
