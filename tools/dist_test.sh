#!/usr/bin/env bash
# Distributed testing with torchrun (mmdet's tools/dist_test.sh).
#   bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py args]
# GPUS is the number of processes per node; environment: see _torchrun.sh.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT GPUS [test.py args]" >&2
    exit 2
fi
source "$(dirname "$0")/_torchrun.sh"
gppf_torchrun "$3" test.py "$1" "$2" "${@:4}"
