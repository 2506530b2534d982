"""Probe of the CAM -> box step on real images: per-crop CAMs of a seeded subset of voc07-sample clicks, fused in
several ways and thresholded at several T_cam, scored by box-CorLoc. It backs the probes logged in
docs/experiments.md (what does and does not move the pseudo-box quality); it has no target and always exits 0.

    .venv/bin/python bench/fusion_probe.py                          # the quality benchmark's classifier
    .venv/bin/python bench/fusion_probe.py --model outputs/TrainClassifier/<hash>/model.pt --crop-size 224
    .venv/bin/python bench/fusion_probe.py --method gradcam --layer stage5 --clicks 500

Fusions: ``sum`` (the paper's Eq. 4, ``--cam-fusion sum``), ``prob`` (each crop's map weighted by the classifier's
probability of the click's class; the pipeline's default ``--cam-fusion prob``), ``maxnorm`` (each crop's map
scaled to max 1 first), ``top4`` (the 4 nearest-centred crops only), ``inv-area`` (weighted by 1/crop area). Two
per-click threshold choices on the ``prob`` fusion: ``oracle T`` (the one of ``--thresholds`` whose box best fits
the clicked object: the ceiling of choosing among them per click; it looks at the ground truth) and ``otsu``
(Otsu's threshold of the normalised map, per click). Also, per click, the box-size error against the clicked object
by object size. Uses the library's functions (extract_crops, make_cam, paste_and_fuse, box_from_cam,
pseudo_box_metrics) and writes ``outputs/bench/fusion_probe/<method>_<layer>_<size>.csv``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline.boxes import PARTITION_MODES, BoxParams, box_from_cam, normalize_map  # noqa: E402
from pipeline.cam import extract_crops, make_cam, paste_and_fuse  # noqa: E402
from pipeline.clicks import other_clicks  # noqa: E402
from pipeline.classifier import load_classifier  # noqa: E402
from pipeline.imageio import read_image  # noqa: E402
from pipeline.io import write_csv  # noqa: E402
from pipeline.metrics import clicked_iou, pseudo_box_metrics  # noqa: E402
from tasks.defaults import TUNED  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "voc07-sample"
FUSIONS = {
    "sum": lambda maps, boxes, prob: np.ones(len(maps)),
    "prob": lambda maps, boxes, prob: prob,  # pipeline.cam.fusion_weights("prob", ...)
    "maxnorm": lambda maps, boxes, prob: 1.0 / np.maximum(maps.reshape(len(maps), -1).max(1), 1e-6),
    "top4": lambda maps, boxes, prob: (np.arange(len(maps)) < 4).astype(float),
    "inv-area": lambda maps, boxes, prob: 1.0 / ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="classifier model.pt (default: the quality benchmark's)")
    ap.add_argument("--method", default="sacam", choices=["sacam", "gradcam"])
    ap.add_argument("--layer", default="", help="CAM layer (default: the model's default)")
    ap.add_argument("--crop-size", type=int, default=0, help="CAM crop size (default: the model's input size)")
    ap.add_argument("--clicks", type=int, default=500, help="seeded subset of the annotator-1 clicks")
    ap.add_argument("--thresholds", default="40,60,80,100,120")
    ap.add_argument("--box-partition", default=TUNED.box_partition, choices=PARTITION_MODES,
                    help="cut each click's map against the image's other clicks, as FusePseudoBoxes --box-partition")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from tasks import SelectProposals, TrainClassifier

    data = dict(voc_root=str(SAMPLE / "VOC2007"), clicks=str(SAMPLE / "clicks_trainval.csv"), annotator=1)
    sel_task = SelectProposals(**data)
    if not sel_task.complete():
        print(f"run bench/quality.py first (no selected proposals at {sel_task.output().path})", file=sys.stderr)
        return 2
    model_path = Path(args.model) if args.model else Path(TrainClassifier(
        **data, device="cpu", classifier_backbone="efficientnet_lite0").output().path) / "model.pt"
    model = load_classifier(model_path, "cpu")
    classes = list(model.classes)
    size = args.crop_size or model.input_size
    layer = args.layer or model.default_cam_layer
    manifest = sel_task.manifest()
    trainval = manifest.split("trainval")
    paths = dict(zip(trainval.image_id, trainval.path))
    objects = manifest.objects[manifest.objects.image_id.isin(set(trainval.image_id))]
    clicks = manifest.clicks.set_index("click_id")
    by_image = {k: g for k, g in manifest.clicks.groupby("image_id")}
    selected = pd.read_parquet(Path(sel_task.output().path) / "selected.parquet").sort_values(["click_id", "rank"])
    by_click = {c: g[["x1", "y1", "x2", "y2"]].to_numpy(float) for c, g in selected.groupby("click_id")}
    rng = np.random.default_rng(args.seed)
    ids = np.sort(rng.choice(clicks.index.to_numpy(), size=min(args.clicks, len(clicks)), replace=False))
    thresholds = [float(t) for t in args.thresholds.split(",")]
    rows = []
    with make_cam(args.method, model, layer) as cam:
        for cid in tqdm(ids, desc="clicks"):
            r = clicks.loc[cid]
            image = read_image(paths[r.image_id])
            boxes = by_click[cid]
            x = extract_crops(image, boxes, size, model.mean, model.std)
            target = classes.index(r["class"])
            maps = cam(x, [target] * len(x)).numpy()
            prob = torch.softmax(cam.outputs.float(), 1)[:, target].numpy()  # the CAM pass's own forward
            others = other_clicks(by_image[r.image_id], int(cid), r["class"], args.box_partition)
            for name, weights in FUSIONS.items():
                fused = paste_and_fuse(maps, boxes, image.shape[:2], weights=weights(maps, boxes, prob))
                for t in thresholds:
                    res = box_from_cam(fused, float(r.x), float(r.y), params=BoxParams("fixed", t), others=others)
                    box = res.box or tuple(boxes[0])
                    rows.append((name, t, r.image_id, r["class"], *box, 1.0, int(cid), int(r.object_index)))
                if name == "prob":
                    norm, _ = normalize_map(fused)
                    t_otsu = 60.0 if norm is None else cv2.threshold(
                        norm.astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]
                    res = box_from_cam(fused, float(r.x), float(r.y), params=BoxParams("fixed", max(t_otsu, 1.0)),
                                      others=others)
                    rows.append(("prob, otsu T", -1.0, r.image_id, r["class"], *(res.box or tuple(boxes[0])), 1.0,
                                 int(cid), int(r.object_index)))
    df = pd.DataFrame(rows, columns=["fusion", "T", "image_id", "class", "x1", "y1", "x2", "y2", "score", "click_id",
                                     "object_index"])
    # the ceiling of a per-click threshold: the prob fusion's box that fits the clicked object best over T
    g = df[(df.fusion == "prob") & (df["T"] >= 0)].reset_index(drop=True)
    best = g.assign(iou=clicked_iou(g, objects).to_numpy()).sort_values("iou", ascending=False)
    df = pd.concat([df, best.drop_duplicates("click_id").drop(columns="iou").assign(fusion="prob, oracle T", T=-1.0)],
                   ignore_index=True)
    table = []
    for (name, t), g in df.groupby(["fusion", "T"], sort=False):
        g = g.reset_index(drop=True)
        s, _ = pseudo_box_metrics(g, objects, classes=manifest.classes)
        table.append({"fusion": name, "T": t, "box_corloc": 100 * s["box_accuracy"],
                      "clicked_acc": 100 * float((clicked_iou(g, objects) >= 0.5).mean())})
    table = pd.DataFrame(table)
    print(f"{len(ids)} clicks, {args.method} at {layer}, {size} px crops, model {model_path}")
    print("box-CorLoc (%) by fusion and T_cam (T -1: a threshold chosen per click):")
    print(table.pivot(index="fusion", columns="T", values="box_corloc").round(1).to_string())

    # box size error of the default (prob, T=60) by the clicked object's size relative to the image
    g = df[(df.fusion == "prob") & (df["T"] == 60.0)].reset_index(drop=True) if 60.0 in thresholds else None
    if g is not None:
        gt = objects.set_index(["image_id", "object_index"]).loc[list(zip(g.image_id, g.object_index))]
        sizes = trainval.set_index("image_id").loc[g.image_id]
        rel = np.sqrt((gt.x2 - gt.x1).to_numpy() * (gt.y2 - gt.y1).to_numpy()
                      / (sizes.width.to_numpy() * sizes.height.to_numpy()))
        ratio = np.log2(((g.x2 - g.x1) * (g.y2 - g.y1)).to_numpy()
                        / ((gt.x2 - gt.x1) * (gt.y2 - gt.y1)).to_numpy())
        ok = clicked_iou(g, objects).to_numpy() >= 0.5
        print("prob, T_cam 60, by object size (sqrt of area / image area): clicks, IoU>=0.5 with the clicked "
              "object, median log2(box area / object area)")
        for lo, hi in ((0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 1.01)):
            m = (rel >= lo) & (rel < hi)
            if m.any():
                print(f"  {lo:.1f}-{hi:.1f}: {m.sum():4d}  {100 * ok[m].mean():5.1f}%  {np.median(ratio[m]):+.2f}")
    out = REPO / "outputs" / "bench" / "fusion_probe" / f"{args.method}_{layer}_{size}.csv"
    write_csv(table, out)
    print(f"table: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
