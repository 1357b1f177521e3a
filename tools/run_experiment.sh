#!/usr/bin/env bash
# The GPPF experiment of issue 12: single-task, dense, dense with per-task
# norms, GPPF with learned and with random fixed routes, on the demo tasks,
# then transfer to trees_det; 3 seeds; writes docs/experiments.md and
# docs/experiments.png (<= 90 min on 2 cores with the defaults). Rerunning
# the same command resumes an interrupted experiment.
#   bash tools/run_experiment.sh [--dry-run] [tools/analysis_tools/
#       gppf_experiment.py args, see --help]
# Needs the environment (bash tools/setup_env.sh) and the demo data
# (bash tools/dataset_converters/prepare_demo_data.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
if [ ! -x .venv/bin/python ]; then
    echo "run_experiment: no .venv; set it up with bash tools/setup_env.sh" >&2
    exit 2
fi
GPPF_EXPERIMENT_CMD="bash tools/run_experiment.sh${*:+ $*}" \
    exec .venv/bin/python tools/analysis_tools/gppf_experiment.py "$@"
