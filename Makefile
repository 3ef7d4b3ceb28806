# Carvana pipeline. `make` (or `make help`) lists the targets; `make all` = venv + demo data (if none)
# + prepare train oof predict submit. Overrides: CONFIG=configs/x.yaml, RAW=path/to/kaggle/data, FOLD=k,
# ARGS="key=value ...". Each target's `##` comment is what `make help` prints.
SHELL := /bin/bash
.DEFAULT_GOAL := help
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
NNODES ?= 1
RDZV   ?=
BENCH  ?=
CACHE  ?= data/cache
MSG    ?=
FILES  ?=
HQ     ?=
WORST  ?=
RUN    ?=
PORT   ?= 6006
CSV    ?=

# Every stage sees the same config: the YAML, then RAW/FOLD/SHARD switches, then ARGS.
# FOLD=k trains fold k and predicts with it alone (so `make all FOLD=0` is one fold end to end).
STAGE_ARGS := --config $(CONFIG) $(if $(RAW),data.raw=$(RAW)) $(if $(FOLD),train.fold=$(FOLD) predict.folds=$(FOLD)) \
              $(if $(SHARD),predict.shard=$(SHARD)) $(ARGS)
export NO_ALBUMENTATIONS_UPDATE := 1
# Not HF_HUB_OFFLINE: encoder_weights=imagenet downloads from the hub for users who are online.
# Tests and benchmarks never need the hub and set it themselves.

.PHONY: help all venv demo-data prepare train train-ddp oof predict predict-ddp submit validate score test bench clean-cache \
        inspect runs tensorboard download kaggle-submit config
# The stages depend on each other's files: never run them side by side, even under `make -j`.
.NOTPARALLEL:

help: ## list the targets and their variables (this text)
	@echo "Carvana pipeline: make <target> [VAR=value ...]   (details: README.md, python -m pipeline <stage> --help)"
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "Variables:"
	@echo "  CONFIG=F       experiment YAML (default configs/default.yaml; configs/carvana512.yaml, configs/kaggle.yaml)"
	@echo "  RAW=DIR        Kaggle-layout data folder (data.raw; default data/raw, the demo set)"
	@echo "  FOLD=k         train and predict fold k only      SHARD=i/N   predict part i of N"
	@echo "  ARGS=\"k=v ..\"  any config key (python -m pipeline config --help lists them)"
	@echo "  SUB=F MASKS=D  a submission and its true masks (validate, score, inspect, kaggle-submit)"
	@echo "  TEST_DIR=NAME  test folder for validate (test_hq)  NPROC=n     processes (per node) for *-ddp"
	@echo "  NNODES=n RDZV=host:port   *-ddp across n machines (the same command on each; host = node 0)"
	@echo "  WORST=n        images in inspect's worst grids     MSG=\"...\"   kaggle-submit message"
	@echo "  RUN=key        inspect or export that run (a key from make runs) instead of this config's"
	@echo "  IN=D OUT=D     cutout: photos in, cutouts out (OUT: export's folder too)  MODEL=D BG=white  cutout's export, background"
	@echo "  FILES=a.zip,.. archives for download             HQ=1        also the HQ archives"
	@echo "  CACHE=DIR      cache for runs/tensorboard/clean-cache (data/cache)  PORT=n  tensorboard port (6006)"
	@echo "  CSV=F          runs: also write the table to F"
	@echo "  BENCH=...      benchmark args (--quick, a name)"

# demo-data generates the embedded set only where data.raw holds no dataset yet (it never overwrites).
all: venv ## venv + demo data (if RAW is unset and none) + prepare train oof predict submit
	@if [ -z "$(RAW)" ]; then $(MAKE) --no-print-directory demo-data; fi
	$(MAKE) --no-print-directory prepare train oof predict submit

# The venv is rebuilt only when requirements.txt or constraints.txt changes. constraints.txt pins
# every package (and dependency) to the versions the tests passed on: reproducible installs.
venv: .venv/.installed ## create .venv from requirements.txt with the versions in constraints.txt
.venv/.installed: requirements.txt constraints.txt
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
	@touch $@

demo-data: venv ## write the embedded synthetic set to data.raw
	$(PY) scripts/synth.py $(STAGE_ARGS)

prepare: venv ## check the raw data, resize, assign folds
	$(PY) scripts/prepare.py $(STAGE_ARGS)

train: venv ## train the fold(s) (FOLD=k for one), OOF maps, TensorBoard events
	$(PY) scripts/train.py $(STAGE_ARGS)

# torchrun on this machine (--standalone), or on NNODES machines when RDZV=host:port (node 0's
# address, a free port): every node runs the same command; the c10d rendezvous numbers the ranks.
TORCHRUN := .venv/bin/torchrun $(if $(RDZV),--nnodes $(NNODES) --rdzv-backend c10d --rdzv-endpoint $(RDZV) \
            --rdzv-id carvana-$(NNODES)x$(NPROC),--standalone) --nproc_per_node $(NPROC)

# The same training under torchrun/DistributedDataParallel (gloo on CPU, nccl on CUDA).
train-ddp: venv ## the same under torchrun, NPROC processes (per node; NNODES= RDZV=host:port across nodes)
	$(TORCHRUN) -m pipeline train $(STAGE_ARGS)

oof: venv ## pooled OOF Dice and the best threshold
	$(PY) scripts/oof.py $(STAGE_ARGS)

predict: venv ## test probabilities per fold, with TTA (SHARD=i/N)
	$(PY) scripts/predict.py $(STAGE_ARGS)

# One shard per rank (RANK/WORLD_SIZE); rank 0 returns once every shard is on disk, so submit can follow.
predict-ddp: venv ## predict under torchrun, one shard per process (NPROC, NNODES= RDZV= as train-ddp)
	$(TORCHRUN) -m pipeline predict $(STAGE_ARGS)

submit: venv ## fold ensemble -> threshold -> RLE -> validated CSV + sidecar
	$(PY) scripts/submit.py $(STAGE_ARGS)

validate: venv ## check SUB=file against the sample (RAW=dir, TEST_DIR=)
	$(PY) scripts/validate.py $(SUB) $(if $(RAW),--sample $(RAW)/sample_submission.csv --test-dir $(TEST_DIR))

score: venv ## mean Dice of SUB=file against MASKS=dir
	$(PY) scripts/score.py $(SUB) $(MASKS)

test: venv ## run the test suite
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench: venv ## run the benchmarks (BENCH=--quick, BENCH=tboard)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py $(BENCH)

# The folder is data.cache as the stages resolve it (CONFIG, then CACHE=DIR when given on the
# command line, then ARGS), printed by `python -m pipeline config`; no venv rebuild for a clean.
clean-cache: ## remove data.cache (every stage's artifacts; CONFIG/ARGS/CACHE choose it, as for the stages)
	@test -x $(PY) || { echo "clean-cache: no $(PY); run make venv" >&2; exit 2; }; \
	cfg="$$($(PY) -m pipeline config $(STAGE_ARGS) $(if $(filter command line,$(origin CACHE)),data.cache=$(CACHE)))" \
	    || exit 2; \
	dir="$$(printf '%s\n' "$$cfg" | $(PY) -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["data"]["cache"])')" \
	    || exit 2; \
	case "$$(realpath -m -- "$$dir")" in /|"$$(realpath .)"|"$$HOME") \
	    echo "clean-cache: refusing to remove $$dir" >&2; exit 2;; esac; \
	echo "rm -rf $$dir"; rm -rf -- "$$dir"

# Seeing the work
config: venv ## print the resolved config (CONFIG, RAW, ARGS)
	@$(PY) -m pipeline config $(STAGE_ARGS)

inspect: venv ## worst images, per-view/per-car tables from the OOF maps (RUN=key, or SUB= MASKS=); WORST=n
	$(PY) -m pipeline inspect $(STAGE_ARGS) $(if $(SUB),inspect.submission=$(SUB)) \
	    $(if $(MASKS),inspect.masks=$(MASKS)) $(if $(WORST),inspect.worst=$(WORST)) $(if $(RUN),inspect.run=$(RUN))

runs: venv ## leaderboard of every trained run in CACHE, best OOF Dice first (CSV=file to save it)
	@$(PY) scripts/runs.py --config $(CONFIG) data.cache=$(CACHE) $(ARGS) $(if $(CSV),--csv $(CSV))

tensorboard: venv ## serve the TensorBoard events of every fold in CACHE on PORT
	.venv/bin/tensorboard --logdir $(CACHE)/train --port $(PORT) --bind_all

download: venv ## fetch the competition data with the kaggle CLI into RAW (FILES=, HQ=1), then prepare
	$(PY) scripts/kaggle_cli.py download $(STAGE_ARGS) $(if $(FILES),--files $(FILES)) $(if $(HQ),--hq)
	$(PY) scripts/prepare.py $(STAGE_ARGS)

kaggle-submit: venv ## validate SUB=file, then submit it to Kaggle (MSG="..." else from the sidecar)
	$(PY) scripts/kaggle_cli.py submit $(SUB) $(STAGE_ARGS) $(if $(MSG),--message "$(MSG)")

# Export a trained run; cut cars out of any photo (docs/export.md)
OUT    ?=
IN     ?=
MODEL  ?=
BG     ?=
.PHONY: export cutout

export: venv ## export the config's run (RUN=key from make runs) as ONNX + safetensors + model.json to OUT (exports/<train key>)
	$(PY) scripts/export.py $(STAGE_ARGS) $(if $(RUN),--run $(RUN)) $(if $(OUT),--out $(OUT))

# No torch in the cutout runner: onnxruntime and the image libraries (MODEL= skips finding the config's export).
cutout: venv ## cut the car out of every photo in IN=dir into OUT=dir: RGBA PNG + mask (MODEL=export dir, BG=white)
	@test -n "$(IN)" -a -n "$(OUT)" || { echo "cutout: set IN=<photo folder> OUT=<output folder>" >&2; exit 2; }
	$(PY) scripts/cutout.py --in "$(IN)" --out "$(OUT)" $(if $(MODEL),--model "$(MODEL)",$(STAGE_ARGS)) \
	    $(if $(BG),--bg "$(BG)")
