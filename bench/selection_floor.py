"""Click-only floors of box-CorLoc on voc07-sample trainval (annotator-1 clicks): what the CAM pipeline must beat.

    .venv/bin/python bench/selection_floor.py [--limit N] [--workers 2] [--proposals path/to/proposals_trainval.h5]

Box-CorLoc (box accuracy, ``pipeline.metrics.box_accuracy``): per class, the fraction of that class's boxes with
IoU >= 0.5 to a ground-truth box of the same class in the same image; then the mean over classes. One box per
click, for:

(a) ``median-size box``: a box centred on the click with the class's median ground-truth width and height,
    clipped to the image. The medians are computed from the ground truth of the evaluated images themselves
    (printed), so this floor knows a little more than clicks alone.
(b) ``rank-1 proposal``: the nearest-centred selected proposal of the click (stage 2 with the pipeline's defaults:
    N=8, T_iou=0.7, the same-class exclusion; ``--sel-*``).
Also printed, for orientation: (c) the largest click-centred window inside the image (the selection's fallback),
and the best of the N selected proposals per click (an oracle upper bound of what picking among them can reach,
not a floor).

Selective search on the 750 images takes minutes: the proposals are cached (resumably) under
``outputs/bench/selection_floor/`` in chunks of 25 images (a rerun, or a larger ``--limit``, computes only what is
missing); ``--limit N`` uses the first N trainval images only, ``--proposals`` reuses a store written by the
SelectiveSearch stage (``outputs/SelectiveSearch/<hash>/proposals_trainval.h5``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.baselines import median_size_boxes  # noqa: E402
from pipeline.dataset import build_manifest  # noqa: E402
from pipeline.metrics import box_accuracy, mean_iou, match_boxes  # noqa: E402
from pipeline.proposals import (ProposalStore, SelectiveSearchParams, merge_proposal_stores,  # noqa: E402
                                run_proposal_shard)
from pipeline.selection import fallback_windows, select_proposals  # noqa: E402
from tasks.defaults import TUNED  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "voc07-sample"
XY = ["x1", "y1", "x2", "y2"]


def proposals_store(images: pd.DataFrame, limit: int, workers: int, chunk: int = 25) -> Path:
    """A store of the first ``limit`` (0: all) images' proposals, from a cache of ``chunk``-image stores in
    trainval order under outputs/bench/selection_floor/ (kept across runs and limits; a killed run resumes)."""
    params = SelectiveSearchParams(TUNED.ss_mode, TUNED.ss_image_max_px, TUNED.ss_box_min_px)  # the pipeline's
    key = hashlib.md5(json.dumps(params.as_dict(), sort_keys=True).encode()).hexdigest()[:8]
    cache = REPO / "outputs" / "bench" / "selection_floor" / f"proposals_{key}"
    n = len(images) if not limit else min(limit, len(images))
    parts, t0, computed = [], time.time(), 0
    for k, start in enumerate(range(0, n, chunk)):
        sub = images.iloc[start:start + chunk]
        part = cache / f"trainval_{k:04d}_{sub.image_id.iloc[0]}_{len(sub)}.h5"
        if not part.is_file():
            print(f"selective search on images {start}..{start + len(sub) - 1} with {workers} processes -> {part}")
            run_proposal_shard(list(sub.image_id), list(sub.path), part, params, workers=workers, progress=True)
            computed += len(sub)
        parts.append(part)
    if computed:
        print(f"  {computed} images in {time.time() - t0:.0f} s ({(time.time() - t0) / computed:.2f} s/image wall)")
    out = cache / f"first_{n}.h5"
    merge_proposal_stores(parts, out, {"source": "selective_search", **params.as_dict()})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=Path, default=SAMPLE, help="voc07-sample directory (VOC2007/ + clicks)")
    ap.add_argument("--limit", type=int, default=0, help="use the first N trainval images only (0: all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--proposals", type=Path, help="an existing proposals_trainval.h5 to use instead")
    ap.add_argument("--sel-per-click", type=int, default=TUNED.sel_per_click)
    ap.add_argument("--sel-nms-iou", type=float, default=TUNED.sel_nms_iou)
    ap.add_argument("--sel-exclusive", type=int, choices=(0, 1), default=int(TUNED.sel_exclusive))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    voc_root = args.sample / "VOC2007"
    if not (voc_root / "Annotations").is_dir():
        print(f"{voc_root}: not found (voc07-sample missing?)", file=sys.stderr)
        return 2
    man = build_manifest(voc_root, args.sample / "clicks_trainval.csv", splits=("trainval",), annotator=1,
                         check_images=False)
    images = man.split("trainval")
    if args.limit:
        images = images.iloc[:args.limit]
    keep = set(images.image_id)
    objects = man.objects[man.objects.image_id.isin(keep)].reset_index(drop=True)
    clicks = man.clicks[man.clicks.image_id.isin(keep)].reset_index(drop=True)
    sizes = {r.image_id: (int(r.width), int(r.height)) for r in images.itertuples(index=False)}
    print(f"voc07-sample trainval: {len(images)} images, {len(objects)} objects, {len(clicks)} annotator-1 clicks")

    if args.proposals:
        store = ProposalStore(args.proposals)
    else:
        store = ProposalStore(proposals_store(man.split("trainval"), args.limit, args.workers))
    missing = keep - set(store.image_ids)
    if missing:
        print(f"{store.path}: no proposals for {len(missing)} images (e.g. {sorted(missing)[:3]})", file=sys.stderr)
        return 2
    print(f"proposals: {store.path} ({np.mean([store.num_boxes(i) for i in keep]):.0f} boxes/image, "
          f"params {store.params})")
    selected, report = select_proposals(clicks, store, n=args.sel_per_click, iou=args.sel_nms_iou,
                                        exclusive=bool(args.sel_exclusive))
    print(f"selection: {report}")

    methods: dict[str, pd.DataFrame] = {}
    methods["(a) median-size box"], medians = median_size_boxes(clicks, objects, sizes)
    rank1 = selected[selected["rank"] == 0]
    assert len(rank1) == len(clicks)
    methods["(b) rank-1 proposal"] = rank1[["click_id", "image_id", "class"] + XY].reset_index(drop=True)
    fb = np.array([fallback_windows(x, y, *sizes[i], scales=(1.0,))[0]
                   for i, x, y in zip(clicks.image_id, clicks.x, clicks.y)])
    methods["(c) largest centred window"] = clicks[["click_id", "image_id", "class"]].assign(
        **{k: fb[:, j] for j, k in enumerate(XY)})
    # oracle: per click, the selected proposal with the best IoU to a GT of its class
    m = match_boxes(selected.reset_index(drop=True), objects)
    best = selected.reset_index(drop=True).loc[m.groupby(selected["click_id"].to_numpy())["iou"].idxmax().to_numpy()]
    methods[f"best of {args.n} selected (oracle)"] = best[["click_id", "image_id", "class"] + XY]

    print("\nclass medians of ground-truth width x height (px), from these images' annotations:")
    print("  " + ", ".join(f"{c} {r.w:.0f}x{r.h:.0f}" for c, r in medians.iterrows()))
    per_class, means = {}, {}
    for name, boxes in methods.items():
        per, mean = box_accuracy(boxes, objects, classes=man.classes)
        _, miou = mean_iou(boxes, objects, classes=man.classes)
        per_class[name], means[name] = per, (mean, miou)
    table = pd.DataFrame(per_class) * 100
    table["clicks"] = clicks.groupby("class").size().reindex(man.classes)
    print("\nbox-CorLoc (%) per class:")
    print(table.round(1).to_string())
    print(f"\n{'method':34s} {'box-CorLoc %':>12s} {'mean IoU':>9s}")
    for name, (mean, miou) in means.items():
        print(f"{name:34s} {100 * mean:12.1f} {miou:9.3f}")
    print(f"\nfloors the CAM pipeline must beat: median-size box {100 * means['(a) median-size box'][0]:.1f}, "
          f"rank-1 proposal {100 * means['(b) rank-1 proposal'][0]:.1f} (box-CorLoc %, {len(images)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
