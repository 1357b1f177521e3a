#!/usr/bin/env bash
# Idempotent set-up of the gppf environment on a CPU machine (Python 3.11).
#
# Creates a virtual environment outside the repository, keyed by the hash of
# requirements.txt, and links it as `.venv` in the repository root. mmcv 2.1.0
# is built from source with its ops once (12-17 min on 2 cores) and the wheel
# is cached under $GPPF_CACHE keyed by the mmcv, torch and Python versions, so
# later runs (and CI on the same machine) take seconds.
#   bash tools/setup_env.sh        # then: .venv/bin/python ...
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${GPPF_CACHE:-$HOME/.cache/gppf}
python=${GPPF_PYTHON:-python3.11}
torch_ver=2.14.1
mmcv_ver=2.1.0
key=$(cat "$repo/requirements.txt" "$repo/tools/setup_env.sh" | sha1sum | cut -c1-10)
venv=${GPPF_VENV:-$cache/venv-$key}
stamp=$venv/.gppf-ready

log() { printf '[setup_env] %s\n' "$*"; }

if [ -f "$stamp" ]; then
  ln -sfn "$venv" "$repo/.venv"
  log "environment ready: $venv"
  exit 0
fi

mkdir -p "$cache"
log "creating $venv"
rm -rf "$venv"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade 'pip>=24' 'setuptools>=77,<81' wheel
log "installing torch $torch_ver (taken from this machine's disk when it lies there)"
"${pip[@]}" install -q "torch==$torch_ver" torchvision==0.29.1

pytag=$("$venv/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheel_dir=$cache/wheels/mmcv-$mmcv_ver-torch$torch_ver-$pytag-cpu
if ! ls "$wheel_dir"/mmcv-*.whl >/dev/null 2>&1; then
  log "building mmcv $mmcv_ver with ops against torch $torch_ver (12-17 min on 2 cores, once)"
  build=$(mktemp -d)
  "${pip[@]}" download -q --no-deps --no-build-isolation --no-binary :all: -d "$build" "mmcv==$mmcv_ver"
  tar -xzf "$build"/mmcv-$mmcv_ver.tar.gz -C "$build"
  src=$build/mmcv-$mmcv_ver
  # torch >= 2.10 headers need C++20; mmcv 2.1.0 hard-codes C++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  mkdir -p "$build/out"
  (cd "$src" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "${pip[@]}" wheel -q --no-build-isolation --no-deps --no-cache-dir -w "$build/out" .)
  mkdir -p "$wheel_dir"
  mv "$build"/out/mmcv-*.whl "$wheel_dir/"
  rm -rf "$build"
fi
log "installing mmcv from $wheel_dir"
"${pip[@]}" install -q --no-deps "$wheel_dir"/mmcv-*.whl
log "installing the rest of requirements.txt"
"${pip[@]}" install -q -r "$repo/requirements.txt"
# mmpretrain 1.2.0 breaks on import beside transformers>=5.
"${pip[@]}" uninstall -y -q transformers >/dev/null 2>&1 || true
"$venv/bin/python" -c "import mmcv, mmdet, mmseg, mmpretrain; from mmcv.ops import nms; print('mmcv', mmcv.__version__, 'mmdet', mmdet.__version__, 'mmseg', mmseg.__version__, 'mmpretrain', mmpretrain.__version__)"
touch "$stamp"
ln -sfn "$venv" "$repo/.venv"
log "environment ready: $venv"
