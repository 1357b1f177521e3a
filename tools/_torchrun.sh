# Sourced by tools/dist_train.sh and tools/dist_test.sh (not run): torchrun
# one of the tools with the repository root on PYTHONPATH.
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT (default 29500).
# Interpreter: $PYTHON, else the repository's .venv, else python.
# On a machine without a GPU the processes run on the CPU with the gloo
# backend (projects/gppf/utils/dist_env.py).

# gppf_torchrun NPROC TOOL [tool args...]
gppf_torchrun() {
    local nproc=$1 tool=$2
    shift 2
    local repo python
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    python=${PYTHON:-}
    if [ -z "$python" ]; then
        if [ -x "$repo/.venv/bin/python" ]; then
            python="$repo/.venv/bin/python"
        else
            python=python
        fi
    fi
    PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" \
    exec "$python" -m torch.distributed.run \
        --nnodes="${NNODES:-1}" \
        --node_rank="${NODE_RANK:-0}" \
        --master_addr="${MASTER_ADDR:-127.0.0.1}" \
        --nproc_per_node="$nproc" \
        --master_port="${PORT:-29500}" \
        "$repo/tools/$tool" "$@" --launcher pytorch
}
