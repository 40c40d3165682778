# sela: self-labeling rounds as Make targets.
#
#   make round              run the next round of $(PIPELINE) (default: the embedded data)
#   make rounds N=5         run the next five rounds
#   make report             rebuild the run's HTML report
#   make table              print the run's headline metrics per round
#   make clean-run          delete the run's outputs and start over
#   make prune              delete finished rounds' features (the run stays up to date)
#   make round SEED=1       the same with another seed, in its own run (runs/<name>-seed1)
#   make compare RUNS=...   runs of one pipeline side by side, with mean and standard deviation
#                           (SEEDS="0 1 2": the runs of those seeds)
#   make test               build and run every test (fetches what the tests need)
#   make data               fetch Fashion-MNIST (Debian package) and ingest all 60k/10k images
#
# Every stage output is a file target, so an interrupted round resumes where it stopped: rerunning
# redoes only what is missing or older than its inputs (editing the pipeline config makes the whole
# run stale). Round 0 is the seeded, untrained model; round r >= 1 solves labels from round r-1's
# features, trains from round r-1's checkpoint, extracts new features and evaluates them.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.SUFFIXES:

PIPELINE ?= pipelines/default.toml
NAME := $(shell sed -n 's/^name *= *"\(.*\)"/\1/p' $(PIPELINE) | head -n 1)
# SEED replaces the config's pipeline.seed (through every stage's --set, so it is stamped into
# the config hash) and gives the run its own directory.
SEED ?=
RUN ?= runs/$(NAME)$(if $(SEED),-seed$(SEED))
TRAIN_DATA := $(shell sed -n 's/^train *= *"\(.*\)"/\1/p' $(PIPELINE) | head -n 1)
TEST_DATA := $(shell sed -n 's/^test *= *"\(.*\)"/\1/p' $(PIPELINE) | head -n 1)
SHARDS ?= 1
N ?= 1
CARGO ?= cargo
PROFILE ?= release
# Where the stage binaries are (cargo's dev profile builds into target/debug).
BIN ?= $(or $(CARGO_TARGET_DIR),target)/$(if $(filter dev,$(PROFILE)),debug,$(PROFILE))
QUIET ?=
STAGE_FLAGS := --config $(PIPELINE) $(if $(SEED),--set pipeline.seed=$(SEED)) $(QUIET)

# The highest round whose evaluation is done, and the next one.
DONE := $(shell ls -d $(RUN)/round-*/eval.json 2>/dev/null | sed 's|.*/round-0*\([0-9][0-9]*\)/eval.json|\1|' | sort -n | tail -n 1)
NEXT := $(shell echo $$(( $(or $(DONE),0) + 1 )))

pad = $(shell printf '%03d' $(1))
round_dir = $(RUN)/round-$(call pad,$(1))
shard_ids := $(shell seq 0 $$(( $(SHARDS) - 1 )))
parts = $(foreach i,$(shard_ids),$(1)/part-$(shell printf '%05d' $(i))-of-$(shell printf '%05d' $(SHARDS)).parquet)

.PHONY: round rounds report table compare clean-run prune build test lint data data-raw data-mini bench bench-sinkhorn bench-train bench-quality check-interop

# The first call evaluates round 0 before it starts round 1 (so metric times follow the rounds).
round: $(if $(filter 1,$(NEXT)),$(call round_dir,0)/eval.json) $(call round_dir,$(NEXT))/eval.json $(RUN)/report.html
	@echo "round $(NEXT) of $(NAME) done: $(call round_dir,$(NEXT))"

rounds:
	@for i in $$(seq $(N)); do $(MAKE) --no-print-directory round PIPELINE=$(PIPELINE) SHARDS=$(SHARDS); done

report: $(RUN)/report.html

clean-run:
	rm -rf $(RUN)

# Every finished round's features but the latest's (the next label step reads those). They are
# intermediate files to Make: the run stays up to date without them, and a stage that has to run
# again re-extracts what it reads.
prune:
	rm -rf $(foreach r,$(shell seq 0 $$(( $(or $(DONE),0) - 1 ))),$(call round_dir,$(r))/features-train $(call round_dir,$(r))/features-test)

build:
	$(CARGO) build --profile $(PROFILE) --workspace --bins --quiet

# ---- one round's rules -------------------------------------------------------------------------

# Features of one split for round $(1): parts of $(2) (train|test) from dataset $(3).
define FEATURES
.SECONDARY: $(call parts,$(call round_dir,$(1))/features-$(2))
$(call parts,$(call round_dir,$(1))/features-$(2)): $(call round_dir,$(1))/features-$(2)/part-%.parquet: $(call round_dir,$(1))/checkpoint.safetensors $(3) $(PIPELINE) | build
	@mkdir -p $$(@D)
	$(BIN)/sela-extract $(STAGE_FLAGS) --round $(1) --checkpoint $$< --dataset $(3) --output $$(@D) \
	  --shard $$$$((10#$$$$(echo $$* | cut -c1-5))) --num-shards $(SHARDS)
endef

define ROUND0
$(call round_dir,0)/checkpoint.safetensors: $(PIPELINE) | build
	@mkdir -p $$(@D)
	$(BIN)/sela-extract $(STAGE_FLAGS) --round 0 --init --checkpoint $$@

$(call round_dir,0)/eval.json: $(call parts,$(call round_dir,0)/features-train) $(call parts,$(call round_dir,0)/features-test) | build
	$(BIN)/sela-eval $(STAGE_FLAGS) --round 0 --features-train $(call round_dir,0)/features-train \
	  --features-test $(call round_dir,0)/features-test --metrics $(RUN)/metrics.parquet \
	  --cluster-stats $(call round_dir,0)/cluster_stats.parquet > $$@.tmp && mv $$@.tmp $$@
endef

# Round $(1) >= 1, previous round $(2).
define ROUND
$(call round_dir,$(1))/labels.parquet $(call round_dir,$(1))/assign-stats.json &: $(call parts,$(call round_dir,$(2))/features-train) $(PIPELINE) | build
	@mkdir -p $$(@D)
	$(BIN)/sela-assign $(STAGE_FLAGS) --round $(1) --logits $(call round_dir,$(2))/features-train \
	  --output $(call round_dir,$(1))/labels.parquet --stats $(call round_dir,$(1))/assign-stats.json \
	  $$(if $$(filter-out 1,$(1)),--warm-start $(call round_dir,$(2))/assign-stats.json --previous $(call round_dir,$(2))/labels.parquet)

$(call round_dir,$(1))/checkpoint.safetensors $(call round_dir,$(1))/train_log.parquet &: $(call round_dir,$(1))/labels.parquet $(call round_dir,$(2))/checkpoint.safetensors $(PIPELINE) | build
	$(BIN)/sela-train $(STAGE_FLAGS) --round $(1) --dataset $(TRAIN_DATA) --labels $(call round_dir,$(1))/labels.parquet \
	  --init $(call round_dir,$(2))/checkpoint.safetensors --output $(call round_dir,$(1))/checkpoint.safetensors \
	  --log $(call round_dir,$(1))/train_log.parquet --resume

$(call round_dir,$(1))/eval.json: $(call parts,$(call round_dir,$(1))/features-train) $(call parts,$(call round_dir,$(1))/features-test) $(call round_dir,$(1))/labels.parquet $(call round_dir,$(1))/assign-stats.json $(call round_dir,$(2))/eval.json | build
	$(BIN)/sela-eval $(STAGE_FLAGS) --round $(1) --features-train $(call round_dir,$(1))/features-train \
	  --features-test $(call round_dir,$(1))/features-test --labels $(call round_dir,$(1))/labels.parquet \
	  --assign-stats $(call round_dir,$(1))/assign-stats.json --metrics $(RUN)/metrics.parquet \
	  --cluster-stats $(call round_dir,$(1))/cluster_stats.parquet > $$@.tmp && mv $$@.tmp $$@
endef

$(eval $(call ROUND0))
$(foreach r,$(shell seq 0 $(NEXT)),$(eval $(call FEATURES,$(r),train,$(TRAIN_DATA))))
$(foreach r,$(shell seq 0 $(NEXT)),$(if $(TEST_DATA),$(eval $(call FEATURES,$(r),test,$(TEST_DATA)))))
$(foreach r,$(shell seq 1 $(NEXT)),$(eval $(call ROUND,$(r),$(shell echo $$(( $(r) - 1 ))))))

$(RUN)/report.html: $(wildcard $(RUN)/round-*/eval.json) $(call round_dir,$(NEXT))/eval.json | build
	$(BIN)/sela-report $(STAGE_FLAGS) --run-dir $(RUN) --output $@

# ---- data --------------------------------------------------------------------------------------

FMNIST_RAW := data/raw/fashion-mnist-deb/usr/share/datasets/fashion-mnist
FMNIST_CLASSES := T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot

data-raw: $(FMNIST_RAW)/train-images-idx3-ubyte.gz

$(FMNIST_RAW)/train-images-idx3-ubyte.gz:
	@mkdir -p data/raw
	cd data/raw && { apt-get download dataset-fashion-mnist 2>/dev/null || { apt-get update -qq && apt-get download dataset-fashion-mnist; }; }
	dpkg-deb -x data/raw/dataset-fashion-mnist_*_all.deb data/raw/fashion-mnist-deb
	touch $@

data: data/fashion-mnist/train.parquet data/fashion-mnist/test.parquet

data/fashion-mnist/train.parquet: $(FMNIST_RAW)/train-images-idx3-ubyte.gz | build
	@mkdir -p $(@D)
	cd $(FMNIST_RAW) && $(CURDIR)/$(BIN)/sela-ingest idx --images train-images-idx3-ubyte.gz \
	  --labels train-labels-idx1-ubyte.gz --class-names '$(FMNIST_CLASSES)' --output $(CURDIR)/$@

data/fashion-mnist/test.parquet: $(FMNIST_RAW)/train-images-idx3-ubyte.gz | build
	@mkdir -p $(@D)
	cd $(FMNIST_RAW) && $(CURDIR)/$(BIN)/sela-ingest idx --images t10k-images-idx3-ubyte.gz \
	  --labels t10k-labels-idx1-ubyte.gz --class-names '$(FMNIST_CLASSES)' --output $(CURDIR)/$@

# The embedded default data (committed): a class-balanced 2,000 + 1,000 image subset.
data-mini: $(FMNIST_RAW)/train-images-idx3-ubyte.gz | build
	@mkdir -p data/fashion-mnist-mini
	cd $(FMNIST_RAW) && $(CURDIR)/$(BIN)/sela-ingest idx --images train-images-idx3-ubyte.gz \
	  --labels train-labels-idx1-ubyte.gz --class-names '$(FMNIST_CLASSES)' --per-class 200 \
	  --output $(CURDIR)/data/fashion-mnist-mini/train.parquet
	cd $(FMNIST_RAW) && $(CURDIR)/$(BIN)/sela-ingest idx --images t10k-images-idx3-ubyte.gz \
	  --labels t10k-labels-idx1-ubyte.gz --class-names '$(FMNIST_CLASSES)' --per-class 100 \
	  --output $(CURDIR)/data/fashion-mnist-mini/test.parquet

# ---- tests and checks --------------------------------------------------------------------------

# What the tests need beyond cargo: the raw IDX files (the embedded data is checked against them)
# and a headless Chromium (the report is checked in a real browser).
test-deps: data-raw
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: test-deps mpi-deps
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace
	$(MAKE) test-mpi

# The label step over MPI (sela-assign's `mpi` feature, off in the default build): OpenMPI, and
# libclang for the MPI bindings, installed when missing; the tests run `mpirun --oversubscribe`.
MPI_PACKAGES := libopenmpi-dev openmpi-bin clang libclang-dev
.PHONY: mpi-deps test-mpi bench-mpi
mpi-deps:
	@dpkg -s $(MPI_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(MPI_PACKAGES) >/dev/null; }

test-mpi: mpi-deps
	$(CARGO) test -p sela-assign --features mpi

lint: mpi-deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p sela-assign --all-targets --features mpi -- -D warnings

# ---- benchmarks (release builds; each prints ratios against a baseline measured in the same run)

bench: bench-sinkhorn bench-train

bench-sinkhorn:
	$(CARGO) bench -p sela-sinkhorn --bench sinkhorn

bench-train:
	$(CARGO) bench -p sela-nn --bench train_speed

# Seconds per iteration of the distributed solve under mpirun for R = 1, 2, and the all-reduce share.
bench-mpi: mpi-deps
	$(CARGO) bench -p sela-assign --features mpi --bench mpi_scaling

# SEEDS="0 1 2" runs the benchmark once per seed (runs/fashion-mnist-seed<s>) and prints the runs
# side by side with their mean and standard deviation; without it, one run with the config's seed.
SEEDS ?=
QUALITY := pipelines/fashion-mnist.toml
QUALITY_ROUNDS = $$(sed -n 's/^rounds *= *\([0-9]*\)/\1/p' $(QUALITY))
bench-quality: data
ifeq ($(strip $(SEEDS)),)
	$(MAKE) clean-run PIPELINE=$(QUALITY)
	time $(MAKE) rounds PIPELINE=$(QUALITY) N=$(QUALITY_ROUNDS)
	$(MAKE) --no-print-directory table PIPELINE=$(QUALITY)
else
	for s in $(SEEDS); do \
	  $(MAKE) clean-run PIPELINE=$(QUALITY) SEED=$$s && \
	  time $(MAKE) rounds PIPELINE=$(QUALITY) SEED=$$s N=$(QUALITY_ROUNDS) && \
	  $(MAKE) --no-print-directory table PIPELINE=$(QUALITY) SEED=$$s || exit 1; \
	done
	$(MAKE) --no-print-directory compare PIPELINE=$(QUALITY) SEEDS="$(SEEDS)"
endif

# The final rounds of RUNS (run directories of $(PIPELINE); default: those of SEEDS) side by
# side, with mean and sd.
RUNS ?= $(foreach s,$(SEEDS),runs/$(NAME)-seed$(s))
compare: | build
	@$(BIN)/sela-report $(STAGE_FLAGS) --compare $(or $(strip $(RUNS)),$(error set RUNS="runs/a runs/b ..." or SEEDS="0 1 2"))

# Per round: test-split ACC/NMI/ARI of the best K = 10 head (head 0's K), 20-NN, linear probe, minutes.
table: | build
	@$(BIN)/sela-report $(STAGE_FLAGS) --run-dir $(RUN) --table
