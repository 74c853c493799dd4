# SynerGen-Lightning. Every target depends on the virtualenv, and every target that produces files is
# a real file target: a fresh clone builds exactly what is missing, and repeating a target is free.
#
#   make demo                       the whole tiny pipeline on CPU, then generation, scoring and a report
#   make test                       lint, then the test suite (make test-fast: without the slow end-to-end tests)
#   make lint                       ruff, and the import-layer contracts (lint-imports; pyproject.toml)
#   make stage1 DEVICES=2           shard the tiny stage 1 over 2 CPU processes (FSDP2, gloo)
#   make stage1 DEVICES=2 STRATEGY=ddp   the same with full copies (DDP: faster for a model that fits in one process)
#   make stage1 RECIPE=recipes/synergen_vl_2b/stage1.yaml DEVICES=8 ARGS="--trainer.num_nodes 1"
#                                   any recipe as written plus ARGS (here: the 2b stage 1 on one 8-GPU node; its
#                                   global batch stays the recipe's, the accumulation is derived)
# the training seed of the tokenizer, the base LLM and the stages (the data stay the same); another SEED retrains them
SEED    ?= 0
# the shape world's level (synergen data synth --help): demo (64 px, learnt in minutes), grid, read (Table 6's
# characters) or full (128 px)
LEVEL   ?= demo
PY      := .venv/bin/python
# the torch build `make install` installs first, so the resolver keeps it; `make check-extras` checks the extras keep it
TORCH   := torch==2.14.1 torchvision==0.29.1
PIP     := .venv/bin/pip
SYN     := .venv/bin/synergen
VENV    := .venv/.installed
DATA    := data/tiny
DEVICES ?= 1
# one intra-op thread per job: make demo runs jobs side by side, and beside another job a second thread slows both
# (RESULTS.md: the base LLM at 1 vs 2 threads); set OMP_NUM_THREADS yourself for bigger models
export OMP_NUM_THREADS ?= 1
ARGS    ?=

# the tiny recipes read the demo level's 64-px canvas; the 128-px levels add recipes/tiny/canvas128.yaml
CANVAS    := $(if $(filter demo,$(LEVEL)),64,128)
LEVEL_CONFIG := $(if $(filter 128,$(CANVAS)),--config recipes/tiny/canvas128.yaml)

# the tiny default's products, in pipeline order; data/tiny holds one level at a time (another LEVEL rewrites it,
# and everything trained on it is rebuilt)
DATA_OK   := $(DATA)/.done-$(LEVEL)
VQ_CKPT   := runs/tiny/tokenizer/checkpoints/last.ckpt
BASE_CKPT := runs/tiny/base_llm/last.ckpt
S1_CKPT   := runs/tiny/stage1/last.ckpt
S2_CKPT   := runs/tiny/stage2/last.ckpt
SFT_CKPT  := runs/tiny/sft/last.ckpt
# a training run's DIR/.done marks it finished: DIR/last.ckpt alone may be the mid-run save of an interrupted run
BASE_DONE := $(dir $(BASE_CKPT)).done
S1_DONE   := $(dir $(S1_CKPT)).done
S2_DONE   := $(dir $(S2_CKPT)).done
SFT_DONE  := $(dir $(SFT_CKPT)).done
CODES     := $(DATA)/codes
CODES_OK  := $(CODES)/.done
DEMO      := runs/demo/report.json
# the demo's (and make eval's) CFG scale: higher, a tiny model scatters the fragments of coloured prompts over the
# canvas (RESULTS.md)
DEMO_CFG  ?= 1.5
SEED_OK   := runs/tiny/.seed-$(SEED)

# several processes (gloo on CPU, nccl on GPUs): STRATEGY=fsdp2 shards the model (FSDP2 under Lightning's
# ModelParallelStrategy); STRATEGY=ddp copies it to every process (one all-reduce per step: faster for a model
# that fits in one process, e.g. the tiny recipes on a multi-core CPU)
STRATEGY ?= fsdp2
STRATEGY_CLASS := synergen_lightning.distributed.$(if $(filter ddp,$(STRATEGY)),DDPStrategy,$(if $(filter fsdp2,$(STRATEGY)),FSDP2Strategy,$(error STRATEGY=$(STRATEGY): use fsdp2 or ddp)))
MULTI     := $(filter-out 1,$(DEVICES))
FIT_FLAGS := --trainer.devices $(DEVICES) $(if $(MULTI),--trainer.strategy.class_path $(STRATEGY_CLASS)) $(ARGS)
# the tiny stages keep their recipe's batch as the GLOBAL batch at any DEVICES (split over the processes), so
# the recipe's hyper-parameters hold; an explicit RECIPE runs as written (the 2b recipes set their own
# global_batch_size and tokens_per_gpu, so their global batch is the same at any DEVICES; docs/distributed.md)
TINY_FIT_FLAGS := --trainer.devices $(DEVICES) $(if $(MULTI),--trainer.strategy.class_path $(STRATEGY_CLASS) --trainer.strategy.init_args.global_batch_size datamodule) $(ARGS)
# usable cores; `nproc` alone obeys OMP_NUM_THREADS, which this Makefile exports as 1 (a sub-make, or make >= 4.4,
# would then count one core)
NPROC := $(shell env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)
# visible NVIDIA GPUs (0 without nvidia-smi): the tiny recipes' `accelerator: auto` puts their processes on them
GPUS ?= $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
ON_GPU := $(filter-out 0,$(GPUS))
# pretokenizing the train shards: one process per core (each encodes whole shards); with GPUs at most 4 per GPU
# (each holds a CUDA context and the tokenizer; `data pretokenize` spreads them over the GPUs)
PRETOKENIZE_WORKERS ?= $(if $(ON_GPU),$(shell n=$$(( $(GPUS) * 4 )); [ $$n -lt $(NPROC) ] && echo $$n || echo $(NPROC)),$(NPROC))
# make demo trains its stages data-parallel over this many CPU processes (one per core, at most 2); on a machine with
# a GPU, on one GPU (the tiny models gain nothing from more, and 2 processes would each ask for a GPU)
DEMO_CORES := $(if $(filter 1,$(NPROC)),1,2)
DEMO_DEVICES ?= $(if $(ON_GPU),1,$(DEMO_CORES))
# make demo's base LLM: intra-op threads once the image tokenizer beside it is done (at most 2, where its weights are
# tested bit-equal to one thread's: tests/test_llm.py; its step then takes 0.6x the time, RESULTS.md)
DEMO_THREADS ?= $(DEMO_CORES)
# $(call logged,LOG,WHAT,COMMAND): COMMAND's output goes to LOG when LOG is set (make demo runs two jobs at once, and
# two progress bars in one terminal garble each other); on failure the log's tail is printed
logged = $(if $(1),@mkdir -p $(dir $(1)) && echo "$(2) (log: $(1))" && { { $(3); } > $(1) 2>&1 || { tail -40 $(1); exit 1; }; },$(3))
# Resumable training runs (the base LLM and the stages), checkpoints in DIR. A run stopped half-way (Ctrl-C, a crash, a
# lost machine) leaves DIR/last.ckpt without DIR/.done: the next make resumes it from there ($(call resume_from,DIR)).
# A finished run whose recipe or inputs changed starts over ($(call start_over_if_finished,DIR) clears it first).
resume_from = $(if $(wildcard $(1).done),,$(if $(wildcard $(1)last.ckpt),--ckpt_path $(1)last.ckpt))
start_over_if_finished = @if [ -f $(1).done ]; then rm -f $(1).done $(1)*.ckpt; fi

.PHONY: help install constraints check-extras wheelhouse check-oldest-torch data tokenizer base-llm stage1 stage2 sft demo ablations eval lint test test-fast test-all bench gpu-check tensorboard geneval-gt clean

help:  ## list the targets
	@grep -E '^[a-z0-9_-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

install: $(VENV)  ## create .venv and install the toolkit (editable, with the dev and lm-eval extras) at the versions of constraints.txt

# every package at the version of constraints.txt, so a fresh install gets the package set the figures in RESULTS.md
# were measured with (only torch is pinned in pyproject.toml; a library's numerics can move the tiny chain's figures)
$(VENV): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch 2.14.1 first, so the resolver keeps it (the registry build with CUDA libs runs on CPU too)
	$(PIP) install -q -c constraints.txt $(TORCH)
	# lm-eval: its adapter's test runs against the real package (it keeps torch and the toolkit's pins)
	$(PIP) install -q -c constraints.txt -e ".[dev,lm-eval]"
	touch $@

constraints: $(VENV)  ## rewrite constraints.txt from the installed packages (after upgrading one on purpose)
	{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^-e'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

check-extras: $(VENV)  ## in a fresh virtualenv: installing each optional extra (dev, lm-eval, lmms-eval, hf) changes neither torch nor the toolkit's pins (pip --dry-run; a few minutes)
	$(PY) bench/check_extras.py --torch "$(TORCH)"

wheelhouse: $(VENV)  ## the wheels a torch GPU image lacks (jsonargparse, omegaconf, webdataset, ...) into wheelhouse/, for an offline node (docs/distributed.md)
	$(PY) bench/wheelhouse.py

# the oldest torch pyproject.toml admits, as GPU images ship it; OLDEST_PYTHON=python3.12 for the images' Python
OLDEST_TORCH  := torch==2.11.0 torchvision==0.26.0
OLDEST_PYTHON ?= python3
check-oldest-torch: wheelhouse  ## make test's suite in .venv-oldest: the oldest torch (2.11), the image's packages, the toolkit's others from the wheelhouse as on an offline node (several GB to download)
	rm -rf .venv-oldest && $(OLDEST_PYTHON) -m venv .venv-oldest
	@# the pins of constraints.txt but torch's own (torch 2.11 brings its CUDA libraries and triton)
	grep -v -E '^((torch|torchvision|triton)==|nvidia-|cuda-)' constraints.txt > .venv-oldest/constraints.txt
	.venv-oldest/bin/pip install -q -c .venv-oldest/constraints.txt $(OLDEST_TORCH) $$($(PY) bench/wheelhouse.py --image) \
		pytest pytest-timeout transformers
	.venv-oldest/bin/pip install -q --no-index --no-deps --target .venv-oldest/wheelhouse-site wheelhouse/*.whl
	PYTHONPATH=$(CURDIR)/.venv-oldest/wheelhouse-site:$(CURDIR) .venv-oldest/bin/python -m pytest -q -p no:cacheprovider -m "not slow or e2e"

data: $(DATA_OK)  ## write the tiny shape world (LEVEL=demo|grid|read|full): train/val shards, eval prompts, text corpus

# the world's code writes the data: a changed world (a new corpus file, other captions) is written again
$(DATA_OK): $(VENV) $(wildcard synergen_lightning/world/*.py)
	$(SYN) data synth --level $(LEVEL) --out $(DATA) --overwrite
	touch $@

tokenizer: $(VQ_CKPT)  ## train the tiny VQ image tokenizer and print its val figures

# TOKENIZER_LOG=FILE sends the fit's output to FILE (make demo trains it beside the base LLM)
$(SEED_OK):
	@rm -f runs/tiny/.seed-*
	@mkdir -p $(@D) && touch $@

$(VQ_CKPT): $(DATA_OK) $(SEED_OK) recipes/tiny/tokenizer.yaml
	$(call logged,$(TOKENIZER_LOG),training the image tokenizer,$(SYN) fit --config recipes/tiny/tokenizer.yaml --seed_everything $(SEED))
	$(SYN) eval tokenizer --tokenizer $@ --shards $(DATA)/val --json runs/tiny/tokenizer/eval.json

base-llm: $(BASE_DONE)  ## pretrain the tiny text-only base LLM (stands in for InternLM2 / Qwen2)

$(BASE_DONE): $(DATA_OK) $(SEED_OK) recipes/tiny/base_llm.yaml
	@# starting over: new data may bring new words, so the BPE is trained again too
	@if [ -f $(@D)/.done ]; then rm -rf runs/tiny/text_tokenizer; fi
	$(call start_over_if_finished,$(@D)/)
	$(SYN) fit --config recipes/tiny/base_llm.yaml --seed_everything $(SEED) $(call resume_from,$(@D)/) $(BASE_LLM_ARGS)
	touch $@

ifdef RECIPE
# an explicit recipe (paper scale, an ablation, your own): run it as given, going on from the run's last checkpoint
# when there is one (`--ckpt_path last`: a preempted run resumes; FORCE=1 starts over)
stage1 stage2 sft: $(VENV)
	$(SYN) fit --config $(RECIPE) $(if $(FORCE),,--ckpt_path last) $(FIT_FLAGS)
else
stage1: $(S1_DONE)  ## stage 1: image-specific parameters only (text logits stay bit-identical)
stage2: $(S2_DONE)  ## stage 2: + self-attention, from stage 1
sft: $(SFT_DONE)    ## SFT: every parameter, from stage 2
# a finished stage is not trained again (whatever DEVICES / STRATEGY say): say so, and how to train it again
stage1 stage2 sft:
	@echo "make $@: runs/tiny/$@ is finished (runs/tiny/$@/.done); FORCE=1 trains it again$(if $(MULTI), with DEVICES=$(DEVICES) STRATEGY=$(STRATEGY))"
endif
# FORCE=1 with stage1 / stage2 / sft named on the command line: those stages start over
ifdef FORCE
$(foreach s,$(filter stage1 stage2 sft,$(or $(MAKECMDGOALS),x)),$(shell rm -f runs/tiny/$(s)/.done runs/tiny/$(s)/*.ckpt))
endif

# the stages read pretokenized views of the whole canvas (KEY.codes.npy): the frozen tokenizer's encode would otherwise cost a
# good share of every step; `synergen fit` without SYNERGEN_TINY_SHARDS encodes on the fly from data/tiny instead.
# PRETOKENIZE_LOG=FILE sends the output to FILE (make demo pretokenizes beside the base LLM's training)
# the codes of another tokenizer must not survive (pretokenize resumes by skipping shards that exist): start empty
$(CODES_OK): $(VQ_CKPT)
	rm -rf $(CODES)
	$(call logged,$(PRETOKENIZE_LOG),pretokenizing the $(CANVAS)-px views,\
	  $(SYN) data pretokenize --tokenizer $(VQ_CKPT) --in $(DATA)/train --out $(CODES)/train --task generation --image-size $(CANVAS) --workers $(PRETOKENIZE_WORKERS) && \
	  $(SYN) data pretokenize --tokenizer $(VQ_CKPT) --in $(DATA)/val --out $(CODES)/val --task generation --image-size $(CANVAS))
	touch $@

$(S1_DONE): $(DATA_OK) $(CODES_OK) $(VQ_CKPT) $(BASE_DONE) recipes/tiny/stage1.yaml
	$(call start_over_if_finished,$(@D)/)
	SYNERGEN_TINY_SHARDS=$(CODES) $(SYN) fit --config recipes/tiny/stage1.yaml $(LEVEL_CONFIG) --seed_everything $(SEED) $(TINY_FIT_FLAGS) $(call resume_from,$(@D)/)
	touch $@

$(S2_DONE): $(S1_DONE) recipes/tiny/stage2.yaml
	$(call start_over_if_finished,$(@D)/)
	SYNERGEN_TINY_SHARDS=$(CODES) $(SYN) fit --config recipes/tiny/stage2.yaml $(LEVEL_CONFIG) --seed_everything $(SEED) $(TINY_FIT_FLAGS) $(call resume_from,$(@D)/)
	touch $@

$(SFT_DONE): $(S2_DONE) recipes/tiny/sft.yaml
	$(call start_over_if_finished,$(@D)/)
	SYNERGEN_TINY_SHARDS=$(CODES) $(SYN) fit --config recipes/tiny/sft.yaml $(LEVEL_CONFIG) --seed_everything $(SEED) $(TINY_FIT_FLAGS) $(call resume_from,$(@D)/)
	touch $@

demo: $(VENV)  ## everything on the tiny default (LEVEL=demo), then scoring -> runs/demo/report.json, samples.png, curve.png
	@$(MAKE) --no-print-directory $(DATA_OK)
	@# the base LLM does not depend on the image tokenizer: one core trains it while the other trains the tokenizer
	@# and then pretokenizes the views with it (one worker: the other core is busy); then the base LLM takes
	@# DEMO_THREADS threads (callbacks/threads.py: its weights are the same at 1 and 2)
	@$(MAKE) --no-print-directory -j2 $(CODES_OK) $(BASE_DONE) TOKENIZER_LOG=runs/tiny/tokenizer.log \
	  PRETOKENIZE_LOG=runs/tiny/pretokenize.log PRETOKENIZE_WORKERS=1 BASE_LLM_ARGS="--trainer.callbacks+=callbacks.threads.ThreadsWhenFree \
	  --trainer.callbacks.free_after $(CODES_OK) --trainer.callbacks.threads $(DEMO_THREADS)"
	@# the stages: data-parallel over DEMO_DEVICES processes (one core each), the recipes' batch split between them
	@$(MAKE) --no-print-directory $(DEMO) DEVICES=$(DEMO_DEVICES) STRATEGY=ddp

$(DEMO): $(SFT_DONE)
	$(SYN) demo report --ckpt $(SFT_CKPT) --curve $(S1_CKPT) $(S2_CKPT) --base-llm $(BASE_CKPT) --data $(DATA) --out runs/demo --cfg $(DEMO_CFG)
	@cat $@

ablations: $(DATA_OK) $(VQ_CKPT) $(BASE_DONE) $(CODES_OK)  ## the paper's Tables 6 and 7 in miniature: Table 6 on the reading level (make ablations LEVEL=read ARGS="--only folding"), Table 7 (ARGS="--only progressive") and the head's width and depth (Table 6b, ARGS="--only head") on the demo level -> runs/ablations/results.json + ablations.md (ARGS="--seeds 0 --only folding" or --quick)
	SYNERGEN_TINY_SHARDS=$(CODES) $(SYN) ablations run $(ARGS)

EVAL_SUITES ?= geneval,und,text
# the paper's benchmarks through the field's evaluators, each on local copies of its files (docs/evaluation.md):
# `make eval` prints these commands for the checkpoint it scored
define PAPER_EVAL
the paper's benchmarks for CKPT=$$ckpt (local files only; docs/evaluation.md):
  GenEval:       synergen eval geneval-official --ckpt $$ckpt --metadata geneval/prompts/evaluation_metadata.jsonl --out geneval_images --samples 4 --cfg 7.5
                 then in GenEval: python evaluation/evaluate_images.py geneval_images --outfile geneval_results.jsonl --model-path OBJECT_DETECTOR_FOLDER
  MJHQ-30K FID:  synergen eval mjhq-fid --ckpt $$ckpt --meta mjhq/meta_data.json --reference mjhq/mjhq30k_imgs --inception-weights inception.pth --out fid_mjhq
  COCO-30K FID:  synergen eval coco-fid --ckpt $$ckpt --captions coco/annotations/captions_val2014.json --reference coco/val2014 --num 30000 --inception-weights inception.pth --out fid_coco
  understanding: lmms-eval --model synergen --model_args pretrained=$$ckpt --batch_size 8 --tasks textvqa_val,gqa,docvqa_val,chartqa,ai2d,mmbench_en_dev,mme,pope --output_path lmms_results
  text (MMLU):   synergen eval lm-eval run --model synergen --model_args pretrained=$$ckpt --tasks mmlu,cmmlu --num_fewshot 5 --batch_size 8 --output_path lm_eval_results
  over N GPUs:   torchrun --nproc-per-node N -m synergen_lightning.cli eval geneval-official|mjhq-fid|coco-fid|lm-eval ... (the same options)
  one report:    synergen eval report --ckpt $$ckpt --suite none --out paper_report --external geneval_results.jsonl --external fid_mjhq/fid.json --external fid_coco/fid.json --external lmms_results/*/*_results.json --external lm_eval_results/*/results_*.json
endef
export PAPER_EVAL
eval: $(VENV)  ## report of the latest tiny run (every tiny stage trains one native view of the canvas) -> runs/tiny/eval/report.md, then the commands of the paper's benchmarks for it (FID: EVAL_SUITES=...,fid FID_WEIGHTS=path.pth; docs/evaluation.md)
	@ckpt=$$(ls -t $(SFT_CKPT) $(S2_CKPT) $(S1_CKPT) 2>/dev/null | head -1); \
	test -n "$$ckpt" || { echo "make eval: no runs/tiny/*/last.ckpt yet; run make stage1 (or make demo) first" >&2; exit 2; }; \
	$(SYN) eval report --ckpt $$ckpt --data $(DATA) --suite $(EVAL_SUITES) --out runs/tiny/eval --overwrite \
	  --cfg $(DEMO_CFG) $(if $(FID_WEIGHTS),--inception-weights $(FID_WEIGHTS)) && \
	echo && echo "$$PAPER_EVAL" | sed "s|\$$ckpt|$$ckpt|g"

geneval-gt: $(DATA_OK)  ## sanity check: the scorer on the world's own renders (expect 1.0)
	$(SYN) eval geneval --prompts $(DATA)/eval_prompts.jsonl --ground-truth --out runs/geneval_gt.json

lint: $(VENV)  ## ruff check, and lint-imports: the package's layers import only downward, with no cycles (pyproject.toml)
	.venv/bin/ruff check .
	.venv/bin/lint-imports --no-cache

test: lint  ## lint, then the test suite CI runs: every fast test plus the short end-to-end runs (< 10 min on 2 cores)
	$(PY) -m pytest -q -m "not slow or e2e"

test-fast: $(VENV)  ## only the fast tests
	$(PY) -m pytest -q -m "not slow"

test-all: $(VENV)  ## every test, the slow end-to-end ones included
	$(PY) -m pytest -q

bench: $(VENV)  ## every benchmark side by side -> bench/results.json + bench/results.md (QUICK=1: tiny sizes)
	$(PY) bench/run_all.py $(if $(QUICK),--quick) --out bench/results.json

gpu-check: $(VENV)  ## on one GPU (< 8 min): reduced-depth 2b step (MFU, memory vs synergen plan), DCP round trip, FlashAttention, tiny stage 1 bf16 FSDP2 +/- compile, the 2b recipes chained on stand-ins, generation -> runs/gpu_check/results.json (CPU: tiny smoke run)
	$(PY) bench/gpu_check.py --out runs/gpu_check/results.json

tensorboard: $(VENV)  ## TensorBoard over every run (losses, lr, throughput, sample grids, evals)
	.venv/bin/tensorboard --logdir runs

clean:  ## remove generated data and runs (keeps .venv)
	rm -rf data runs
