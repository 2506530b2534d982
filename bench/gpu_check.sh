#!/usr/bin/env bash
# GPU speed check (issue 23), one command, under 8 minutes on a CUDA machine; no test depends on it:
#   1. the paper's VGG16 preset SA-CAM images/s (bench/cam_throughput.py on CUDA: 8 crops per click, one click per
#      image, batched SA-CAM + paste/fuse; target >= 100 images/s, the paper's 8.6 on a Titan XP) -- random VGG16
#      weights: the speed does not depend on them;
#   2. Fast R-CNN seconds per training iteration and test images/s with the paper preset (VGG16, 600 px) on CUDA
#      (bench/detector_speed.py --device cuda): ImageNet weights when they load, else random init (said so).
# Images: voc07-sample (../shared/data/voc07-sample) when present, else a small synthetic VOC root made here.
#
#   bash bench/gpu_check.sh            # writes outputs/bench/gpu_check/{cam.json,detector.log,cam.log}
# Exits 2 at once without a CUDA device; non-zero when a step fails or a target of cam_throughput is missed.
set -uo pipefail  # (no -e: step 2 runs even when step 1 fails; the exit status says which)
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=outputs/bench/gpu_check
SAMPLE=../shared/data/voc07-sample/VOC2007

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu_check.sh: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine" >&2
    exit 2
fi
mkdir -p "$OUT" || exit 1
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'
start=$SECONDS

echo "== 1/2 VGG16 SA-CAM images/s (random weights: speed does not depend on them)"
timeout 240 "$PY" bench/cam_throughput.py --device cuda --backbones vgg16 --gpu-images 256 --gpu-batch 64 \
    --repeats 3 --json "$OUT/cam.json" 2>&1 | tee "$OUT/cam.log"
cam_rc=${PIPESTATUS[0]}

echo "== 2/2 Fast R-CNN (paper preset: VGG16, 600 px) s/iteration on CUDA"
root=$SAMPLE
if [ ! -d "$root/Annotations" ]; then
    root=$OUT/synthetic/VOC2007
    echo "voc07-sample not found at $SAMPLE: timing on 16 synthetic images (500 px) in $root"
    "$PY" -c "from pipeline.synthetic import ensure_dataset; ensure_dataset('$OUT/synthetic', n_trainval=16, n_test=1, image_size=500)"
fi
weights=imagenet
if ! "$PY" -c 'from pipeline.backbones import build_backbone; build_backbone("vgg16", 2, "imagenet")' >/dev/null 2>&1; then
    weights=random
    echo "VGG16 ImageNet weights are not available here (offline?): the detector is timed with random weights" \
         "(the speed does not depend on them)"
fi
timeout 300 "$PY" bench/detector_speed.py --device cuda --preset paper --weights "$weights" --images 16 \
    --iters 20 --voc-root "$root" 2>&1 | tee "$OUT/detector.log"
det_rc=${PIPESTATUS[0]}

echo "gpu_check: $((SECONDS - start)) s; cam_throughput exit $cam_rc, detector_speed exit $det_rc; logs in $OUT"
[ "$cam_rc" -eq 0 ] && [ "$det_rc" -eq 0 ]
