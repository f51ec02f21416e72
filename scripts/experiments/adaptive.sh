#!/usr/bin/env bash
# Adaptive batch experiment (issue 6 item 3): fixed small, fixed large and adaptive global batch
# on the synthetic contrastive task and the digits classifier; steps and examples to a target.
# See docs/EXPERIMENTS.md.
#
#   scripts/experiments/adaptive.sh                     # both tasks
#   scripts/experiments/adaptive.sh --tasks digits      # one task
#
# Results: runs/experiments/adaptive/{runs.csv,summary.md}, one directory per run. Finished runs
# are reused on a re-run; delete runs/experiments/adaptive to start over. Set TESSERA to use
# another binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ ! -x "${TESSERA:-target/release/tessera}" ]]; then
  cargo build --release -p tessera-launch
fi
exec python3 scripts/experiments/adaptive.py "$@"
