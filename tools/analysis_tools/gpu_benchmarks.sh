#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md that a lent GPU measures, in one run
# that fits the 10 minutes a lent GPU allows one command (each backbone
# benchmark at most 90 s, the SIMT one 200 s):
#   * LegoResNet-50 and LegoViT-B against their stock backbones, forward +
#     backward, bf16: batch 32 x 224² and detection's 2 x 800x1344 per GPU;
#   * one 3-task SIMT iteration of GPPF-R50 (COCO + ADE20K + ImageNet at the
#     config's per-GPU batches, random data of those shapes, fp16 AMP: mmcv's
#     nms has no bf16 kernel) against each task's stock model.
# Usage: bash tools/analysis_tools/gpu_benchmarks.sh [OUT_DIR]
#   (default work_dirs/gpu_benchmarks; one log per benchmark there).
#   PYTHON picks the interpreter (default python), DEVICE the device (cuda).
set -uo pipefail
out=${1:-work_dirs/gpu_benchmarks}
py=${PYTHON:-python}
device=${DEVICE:-cuda}
tools=tools/analysis_tools
mkdir -p "$out"
failed=0

run() {  # NAME SECONDS ARGS...: one benchmark, its output in OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name: $py $*"
  timeout "$limit" "$py" "$@" --device "$device" >"$out/$name.txt" 2>&1
  local rc=$?
  grep -E '^(device|ratio|time|memory|stock|  )' "$out/$name.txt"
  if [ "$rc" -ne 0 ]; then
    echo "!! $name exited $rc (log: $out/$name.txt)"
    failed=1
  fi
}

run resnet50_b32 90 $tools/benchmark_lego_resnet.py --batch 32 --amp bf16 \
  --channels-last --iters 20
run resnet50_det 90 $tools/benchmark_lego_resnet.py --batch 2 --size 800x1344 \
  --amp bf16 --channels-last --iters 20
run vit-b_b32 90 $tools/benchmark_lego_vit.py --batch 32 --amp bf16 --rounds 20
run vit-b_det 90 $tools/benchmark_lego_vit.py --batch 2 --img-size 800x1344 \
  --amp bf16 --rounds 20
run simt_r50 200 $tools/benchmark_simt.py \
  configs/gppf/gppf_lego-r50_8xb2-2-32-90k_coco-ade20k-in1k.py --amp \
  --stock --synthetic coco_det=2x800x1344 ade20k_seg=2x512x512 \
  in1k_cls=32x224x224 --iters 10 --out "$out/simt_r50.json"
exit $failed
