#!/usr/bin/env bash
# The main job: set up (idempotent), prepare the offline demo data, run the
# short SIMT pre-training of the demo config with evaluation at the end.
#   bash tools/run_demo.sh [CONFIG.py] [extra tools/train.py args, e.g. --cfg-options ...]
# CONFIG.py defaults to the LegoResNet-18 demo.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash tools/setup_env.sh
bash tools/dataset_converters/prepare_demo_data.sh
config=configs/gppf/gppf_lego-r18_1xb8-8-32-1k_gppf-demo.py
if [[ ${1:-} == *.py ]]; then config=$1; shift; fi
exec .venv/bin/python tools/train.py "$config" "$@"
