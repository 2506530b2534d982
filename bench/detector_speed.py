"""Fast / Faster R-CNN speed on the CPU (or GPU): seconds per training iteration and test images/s.

    .venv/bin/python bench/detector_speed.py [--arch fast_rcnn] [--preset cpu] [--backbone efficientnet_lite0]
                                             [--images 8] [--iters 10] [--threads 2] [--device auto] [--voc-root DIR]

Uses the first ``--images`` trainval images of ../shared/data/voc07-sample (real VOC images, ~500x375; or of
another VOC root, ``--voc-root``, e.g. a synthetic one, whose classes are then its objects' classes) with their
ground-truth boxes and selective-search proposals computed here (fast mode, longest side 500, as the
SelectiveSearch stage does), ImageNet weights, and the preset's training recipe (2 images per batch, 128 RoIs,
flips). Training time per iteration includes image reading and the optimizer step (``train_detector``'s own
per-epoch timing); test time is reported with image reading (``fps``) and for the forward passes only
(``model_fps``), and for EvaluateVOC07's CorLoc pass (top box of every class, no score threshold:
``corloc_fps``), and, for a fast_rcnn, with the selective search of each image included (``fps_with_proposals``;
a faster_rcnn needs none, so there it is ``fps``). Prints a table and writes ``outputs/bench/detector_speed.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = REPO.parent / "shared" / "data" / "voc07-sample" / "VOC2007"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.detector import DetectionDataset, build_detector, detect, preset, train_detector  # noqa: E402
from pipeline.device import resolve_device  # noqa: E402
from pipeline.imageio import read_image  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.proposals import selective_search  # noqa: E402
from pipeline.voc import VOC_CLASSES, load_voc  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="fast_rcnn", choices=["fast_rcnn", "faster_rcnn"])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--backbone", default=None, help="override the preset's backbone")
    ap.add_argument("--freeze-through", default=None,
                    help="trunk layers frozen up to and including this one (default: the backbone's)")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10, help="training iterations timed (2 images each)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    ap.add_argument("--voc-root", type=Path, default=SAMPLE, help="a VOC2007-layout root (default voc07-sample)")
    args = ap.parse_args(argv)
    if not (args.voc_root / "Annotations").is_dir():
        print(f"no VOC root at {args.voc_root} (voc07-sample missing? pass --voc-root)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    images, objects = load_voc(args.voc_root, ("trainval",), None)
    classes = VOC_CLASSES if set(objects["class"]) <= set(VOC_CLASSES) else tuple(sorted(set(objects["class"])))
    images = images.head(args.images).reset_index(drop=True)
    objects = objects[objects.image_id.isin(set(images.image_id)) & ~objects.difficult]
    t0 = time.perf_counter()
    proposals = {r.image_id: selective_search(read_image(r.path)) for r in images.itertuples()}
    ss_s = time.perf_counter() - t0
    n_props = float(np.mean([len(p) for p in proposals.values()]))
    ss_per_image = ss_s / len(images)

    over = {"weights": args.weights, "epochs": 1, "warmup_iters": 0, "arch": args.arch}
    if args.arch == "faster_rcnn":
        over["bg_iou_lo"] = 0.0  # as TrainFastRCNN sets it
        proposals = None
    if args.backbone:
        over["backbone"] = args.backbone
    if args.freeze_through:
        over["freeze_through"] = args.freeze_through
    cfg = preset(args.preset, **over)
    model = build_detector(classes, cfg)
    ds = DetectionDataset(images, proposals, classes, objects, flip=True, seed=0)
    # one warm-up iteration, then the timed ones (the dataset is cycled when --iters exceeds it)
    reps = max(1, int(np.ceil(2 * args.iters / len(images))))
    big = DetectionDataset(images.loc[np.tile(np.arange(len(images)), reps)].reset_index(drop=True), proposals,
                           classes, objects, flip=True, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        train_detector(model, ds, Path(tmp) / "warm.pth", device, max_iters_per_epoch=1, progress=False)
        log = train_detector(model, big, Path(tmp) / "ckpt.pth", device, max_iters_per_epoch=args.iters,
                             progress=False)
    s_iter = float(log.s_per_iter.iloc[0])
    detect(model, DetectionDataset(images.head(1), proposals, classes), device, progress=False)  # warm-up
    _, stats = detect(model, DetectionDataset(images, proposals, classes), device, progress=False)
    # EvaluateVOC07's CorLoc pass on trainval: every class's top box, no score threshold
    _, top_stats = detect(model, DetectionDataset(images, proposals, classes), device, progress=False,
                          top_per_class=True)
    cfg = model.config
    with_props = stats["fps"] if proposals is None else 1.0 / (ss_per_image + 1.0 / stats["fps"])
    result = {"arch": cfg.arch, "backbone": cfg.backbone, "freeze_through": cfg.freeze_through, "preset": args.preset,
              "min_size": cfg.min_size, "max_size": cfg.max_size,
              "device": str(device), "threads": args.threads, "images": len(images),
              "proposals_per_image": n_props if proposals is not None else cfg.rpn_post_nms_test,
              "selective_search_s_per_image": ss_per_image if proposals is not None else 0.0,
              "train_iterations": int(log.iterations.iloc[0]), "train_s_per_iter": s_iter,
              "train_loss": float(log.loss.iloc[0]), "test_fps": stats["fps"], "test_model_fps": stats["model_fps"],
              "corloc_fps": top_stats["fps"], "fps_with_proposals": with_props}
    print(f"{'arch':<12}{'backbone':<20}{'scale':>10}{'device':>8}{'threads':>8}{'props/img':>10}{'s/iter':>9}"
          f"{'test img/s':>11}{'+proposals':>11}{'model img/s':>12}{'CorLoc img/s':>13}")
    print(f"{cfg.arch:<12}{cfg.backbone:<20}{f'{cfg.min_size}/{cfg.max_size}':>10}{str(device):>8}{args.threads:>8}"
          f"{result['proposals_per_image']:>10.0f}{s_iter:>9.3f}{stats['fps']:>11.2f}{with_props:>11.2f}"
          f"{stats['model_fps']:>12.2f}{top_stats['fps']:>13.2f}")
    out = REPO / "outputs" / "bench" / f"detector_speed{'' if args.arch == 'fast_rcnn' else '_' + args.arch}.json"
    write_json(out, result)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
