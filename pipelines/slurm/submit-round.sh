#!/usr/bin/env bash
# Submits one self-labeling round of a pipeline to Slurm, stages wired with --dependency=afterok:
#
#   assign (1 task, or an MPI job) -> train (1 task)
#   -> extract train+test (array jobs, one shard per task) -> eval (1 task) -> report (1 task)
#
# Round 0 (the seeded initial model) is: init -> extract arrays -> eval.
#
# SELA_MPI=1 runs the label step as an MPI job of SELA_MPI_RANKS tasks (default 4), one per node,
# each `srun` task one rank of sela-assign (see assign.sbatch; build it with --features mpi).
# AFTER=JOBID makes the round's first job wait for that job (afterok): pass the last job id a
# previous call printed to queue round r+1 behind round r (its extraction arrays included).
#
# Usage: pipelines/slurm/submit-round.sh PIPELINE.toml ROUND [SHARDS]
# Run from the repository root after `make build` (binaries in $SELA_BIN, default target/release). Outputs land in
# runs/<pipeline name>/round-RRR/ exactly as `make round` lays them out, so Make and Slurm can
# take turns on the same run (RUN_DIR overrides runs/<name>). SEED=s replaces the config's
# pipeline.seed in every stage and makes the run runs/<name>-seed<s>, as `make round SEED=s` does.
# Extra sbatch flags (partition, account, ...) go in SBATCH_FLAGS.
set -euo pipefail

pipeline=${1:?usage: submit-round.sh PIPELINE.toml ROUND [SHARDS]}
round=${2:?usage: submit-round.sh PIPELINE.toml ROUND [SHARDS]}
shards=${3:-16}
here=$(cd "$(dirname "$0")" && pwd)
export SELA_BIN=${SELA_BIN:-target/release}
name=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$pipeline" | head -n 1)
train_data=$(sed -n 's/^train *= *"\(.*\)"/\1/p' "$pipeline" | head -n 1)
test_data=$(sed -n 's/^test *= *"\(.*\)"/\1/p' "$pipeline" | head -n 1)
run=${RUN_DIR:-runs/$name${SEED:+-seed$SEED}}
dir=$run/$(printf 'round-%03d' "$round")
prev=$run/$(printf 'round-%03d' $((round - 1)))
mkdir -p "$dir" "$run/slurm-logs"

submit() { # prints the job id
    sbatch --parsable ${SBATCH_FLAGS:-} --output="$run/slurm-logs/%x-%A_%a.out" "$@"
}
export PIPELINE=$pipeline ROUND=$round RUN_DIR=$run ROUND_DIR=$dir PREV_DIR=$prev SEED=${SEED:-}
seed_flags=${SEED:+--set pipeline.seed=$SEED}

after=()
[ -n "${AFTER:-}" ] && after=(--dependency=afterok:"$AFTER")
if [ "$round" -eq 0 ]; then
    dep=$(submit --job-name=sela-init "${after[@]}" --wrap \
        "$SELA_BIN/sela-extract --config $pipeline $seed_flags --round 0 --init --checkpoint $dir/checkpoint.safetensors")
else
    mpi=()
    if [ "${SELA_MPI:-0}" = 1 ]; then
        ranks=${SELA_MPI_RANKS:-4}
        mpi=(--nodes="$ranks" --ntasks="$ranks" --ntasks-per-node=1)
    fi
    dep=$(submit --job-name=sela-assign "${after[@]}" "${mpi[@]}" "$here/assign.sbatch")
    dep=$(submit --job-name=sela-train --dependency=afterok:"$dep" "$here/train.sbatch")
fi

extract_ids=()
for split in train test; do
    data=$train_data
    [ "$split" = test ] && data=$test_data
    [ -n "$data" ] || continue
    extract_ids+=("$(DATASET=$data SPLIT=$split submit --job-name=sela-extract-$split \
        --array=0-$((shards - 1)) --dependency=afterok:"$dep" "$here/extract.sbatch")")
done
deps=$(IFS=:; echo "${extract_ids[*]}")
dep=$(submit --job-name=sela-eval --dependency=afterok:"$deps" "$here/eval.sbatch")
dep=$(submit --job-name=sela-report --dependency=afterok:"$dep" --wrap \
    "$SELA_BIN/sela-report --config $pipeline $seed_flags --run-dir $run --output $run/report.html")
echo "round $round of $name submitted; last job $dep"
