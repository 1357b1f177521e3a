#!/usr/bin/env bash
# Distributed training with torchrun (mmdet's tools/dist_train.sh).
#   bash tools/dist_train.sh CONFIG GPUS [train.py args]
# GPUS is the number of processes per node; environment: see _torchrun.sh.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG GPUS [train.py args]" >&2
    exit 2
fi
source "$(dirname "$0")/_torchrun.sh"
gppf_torchrun "$2" train.py "$1" "${@:3}"
