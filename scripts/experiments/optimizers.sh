#!/usr/bin/env bash
# Optimizer comparison (issue 5 item 5): SGD, LARS with and without warm-up, TVLARS and LAMB on
# the digits classifier and the synthetic contrastive task, small and large global batch,
# several seeds, a learning-rate grid per optimizer. See docs/EXPERIMENTS.md.
#
#   scripts/experiments/optimizers.sh                  # both tasks
#   scripts/experiments/optimizers.sh --tasks digits   # one task
#
# Results: runs/experiments/optimizers/{runs.csv,summary.md}, one directory per run (its
# command.txt, config, metrics.jsonl and summary.json). Finished runs are reused on a re-run;
# delete runs/experiments/optimizers to start over. Set TESSERA to use another binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ ! -x "${TESSERA:-target/release/tessera}" ]]; then
  cargo build --release -p tessera-launch
fi
exec python3 scripts/experiments/optimizers.py "$@"
