"""How far can two clicks' size information take stage 5? (issue #22; docs/results.md, "SA-CAM with two clicks").

On the two-click SA-CAM maps of voc07-sample (``FusePseudoBoxes --clicks-per-object 2``, its stages cached or
computed), every paired click's boxes at T_cam = 10, 20, ..., 240 (``pipeline.clickpairs.AREA_THRESHOLDS``), one
kept per click by:

* the default T_cam;
* ``choose_by_area`` (``--box-area-prior on``: the pair's distance);
* ``choose_by_extent`` (``--box-area-prior axes``: the pair's x and y differences, self-calibrated);
* ``choose_by_learned_extent`` (``--box-area-prior learned``: the same, its prior learned from the click pairs),
  its ablations, and both on pairs with annotator slips (``--outlier-pairs``);
* the per-axis model with the click simulator's own constant (k = 0.08, voc07-sample's README) and fixed prior
  spreads (what a perfectly known error law would give);
* two oracles with the ground truth: the box nearest the clicked object's true area, and the box of best IoU with it.

    .venv/bin/python bench/two_click_probe.py                     # the maps of the default (--cam-paste grid)
    .venv/bin/python bench/two_click_probe.py --cam-paste resize  # the maps pasted as before the paste fix

Prints a table (box-CorLoc, mean IoU) and writes it to ``outputs/bench/two_click_probe.md``. A probe, no target.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)

import luigi  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.boxes import classes_per_image, pseudo_boxes_and_candidates  # noqa: E402
from pipeline.cam_store import FusedMaps  # noqa: E402
from pipeline.clickpairs import (AREA_THRESHOLDS, ExtentModel, choose_by_area, choose_by_extent,  # noqa: E402
                                 choose_by_learned_extent)
from pipeline.export import with_object_index  # noqa: E402
from pipeline.io import write_text  # noqa: E402
from pipeline.markdown import markdown_table  # noqa: E402
from pipeline.metrics import clicked_iou, pseudo_box_metrics  # noqa: E402
from tasks.pseudo import FusePseudoBoxes  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "voc07-sample"
SIMULATOR_K = 0.08  # voc07-sample's README: per-axis click error 0.08 x the box side


def pick(boxes: pd.DataFrame, cand: pd.DataFrame, key: str, ascending: bool) -> pd.DataFrame:
    """``boxes`` with each click's box replaced by its candidate of the best ``key``."""
    best = cand.sort_values(["click_id", key], ascending=[True, ascending]).drop_duplicates("click_id")
    best = best.set_index("click_id")
    out = boxes.set_index("click_id")
    idx = out.index.intersection(best.index)
    out.loc[idx, ["x1", "y1", "x2", "y2"]] = best.loc[idx, ["x1", "y1", "x2", "y2"]].to_numpy()
    return out.reset_index()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cam-paste", default="grid", choices=["grid", "resize"])
    ap.add_argument("--outlier-pairs", default="0.05,0.1",
                    help="comma-separated shares of pairs whose second click is moved to a uniform point within "
                         "+-half the default box of the first (the means kept): axes and learned on them, a "
                         "robustness check against annotator slips (the simulated clicks have none); empty: none")
    args = ap.parse_args(argv)
    task = FusePseudoBoxes(voc_root=str(SAMPLE / "VOC2007"), clicks=str(SAMPLE / "clicks_trainval.csv"),
                           annotator=1, cam_method="sacam", clicks_per_object="2", annotators="1,2",
                           cam_paste=args.cam_paste)
    luigi.build(task.requires().values(), local_scheduler=True, log_level="WARNING")  # the maps
    man = task.manifest()
    clicks, trainval = man.clicks, man.split("trainval")
    sizes = {r.image_id: (int(r.width), int(r.height)) for r in trainval.itertuples(index=False)}
    objects = man.objects[man.objects.image_id.isin(set(trainval.image_id))]
    with FusedMaps(task.map_readers()) as maps:
        items, _ = maps.items(clicks)
        boxes, cand = pseudo_boxes_and_candidates(items, task.fallback_boxes()[1], classes_per_image(clicks),
                                                  task.box_params(), image_sizes=sizes, clicks=clicks,
                                                  candidate_thresholds=AREA_THRESHOLDS)
    rows = []

    def row(name: str, b: pd.DataFrame) -> None:
        m = pseudo_box_metrics(b, objects, man.classes)[0]
        rows.append({"choice among a click's boxes at T_cam = 10..240": name,
                     "box-CorLoc": round(100 * m["box_accuracy"], 1), "mean IoU": round(100 * m["mean_iou"], 1)})

    row("the default T_cam", boxes)
    row("distance area score (--box-area-prior on)",
        choose_by_area(boxes, cand, clicks, task.box_area_map_sigma)[0].drop(columns=["area_mu", "area_sigma"]))
    chosen, report = choose_by_extent(boxes, cand, clicks)
    ks = [m["k"] for m in report["models"]]
    sigmas = [m["sigma"] for m in report["models"]]
    row(f"per-axis extent, self-calibrated (--box-area-prior axes; k {min(ks):.3f}-{max(ks):.3f}, "
        f"sigma {min(sigmas):.2f}-{max(sigmas):.2f})", chosen)
    chosen, report = choose_by_learned_extent(boxes, cand, clicks, image_sizes=sizes)
    ks = [m["k"] for m in report["models"]]
    sigmas = [m[s] for m in report["models"] for s in ("sigma_x", "sigma_y")]
    row(f"per-axis extent, prior learned across images (--box-area-prior learned; k {min(ks):.3f}-{max(ks):.3f}, "
        f"sigma {min(sigmas):.2f}-{max(sigmas):.2f})", chosen)
    # its ablations: feature groups, and an L2 penalty on the prior's coefficients (the default's is 1e-3)
    for groups, name in ((("class",), "without the crowding features"), ((), "the default box's sides only")):
        row(f"learned prior, {name}", choose_by_learned_extent(boxes, cand, clicks, image_sizes=sizes,
                                                               groups=groups)[0])
    for l2 in (0.1, 1.0, 10.0):
        row(f"learned prior, L2 penalty {l2:g}", choose_by_learned_extent(boxes, cand, clicks, image_sizes=sizes,
                                                                          l2=l2)[0])
    # annotator slips: a share of the pairs' second clicks moved (seeded), only the size cue affected
    rng = np.random.default_rng(0)
    b_by_click = boxes.set_index("click_id").reindex(clicks["click_id"])
    half_w = ((b_by_click.x2 - b_by_click.x1) / 2).to_numpy()
    half_h = ((b_by_click.y2 - b_by_click.y1) / 2).to_numpy()
    for share in [float(x) for x in args.outlier_pairs.split(",") if x.strip()]:
        slipped = clicks.copy()
        moved = (rng.random(len(clicks)) < share) & (clicks["n_clicks"] == 2).to_numpy()
        slipped.loc[moved, "x_b"] = slipped.x_a[moved] + rng.uniform(-1, 1, moved.sum()) * half_w[moved]
        slipped.loc[moved, "y_b"] = slipped.y_a[moved] + rng.uniform(-1, 1, moved.sum()) * half_h[moved]
        row(f"{share:.0%} of pairs slipped: per-axis extent (axes)", choose_by_extent(boxes, cand, slipped)[0])
        row(f"{share:.0%} of pairs slipped: learned prior", choose_by_learned_extent(boxes, cand, slipped,
                                                                                  image_sizes=sizes)[0])
    # the per-axis model with the simulator's k and fixed prior spreads (lone clicks: the prior alone)
    c = clicks.set_index("click_id").reindex(cand["click_id"])
    b0 = boxes.set_index("click_id").reindex(cand["click_id"])
    dx = np.nan_to_num((c["x_a"] - c["x_b"]).to_numpy(float))
    dy = np.nan_to_num((c["y_a"] - c["y_b"]).to_numpy(float))
    w, h = (cand.x2 - cand.x1).to_numpy(float), (cand.y2 - cand.y1).to_numpy(float)
    for sigma in (0.3, 0.5, 0.8):
        post = ExtentModel(SIMULATOR_K, sigma).log_posterior(dx, dy, w, h, (b0.x2 - b0.x1).to_numpy(float),
                                                             (b0.y2 - b0.y1).to_numpy(float))
        row(f"per-axis extent, the simulator's k = {SIMULATOR_K}, prior spread {sigma}",
            pick(boxes, cand.assign(post=post), "post", False))
    # oracles on the clicked object's ground truth
    withobj = with_object_index(cand.drop(columns=[c for c in ("image_id", "class") if c in cand])
                                .merge(clicks[["click_id", "image_id", "class"]], on="click_id"), clicks)
    gt = objects.assign(image_id=objects.image_id.astype(str)).set_index(["image_id", "object_index"])
    key = pd.MultiIndex.from_arrays([withobj.image_id.astype(str), withobj.object_index.astype(int)])
    g = gt.reindex(key)
    true_log_area = np.log(((g.x2 - g.x1) * (g.y2 - g.y1)).to_numpy(float))
    ww, hh = (withobj.x2 - withobj.x1).to_numpy(float), (withobj.y2 - withobj.y1).to_numpy(float)
    row("oracle: the box nearest the true area",
        pick(boxes, withobj.assign(gap=np.abs(np.log(ww * hh) - true_log_area)), "gap", True))
    row("oracle: the box of best IoU", pick(boxes, withobj.assign(iou=clicked_iou(withobj, objects)), "iou", False))
    md = (f"Two clicks on voc07-sample, maps pasted with --cam-paste {args.cam_paste}\n\n"
          + markdown_table(list(rows[0]), [list(r.values()) for r in rows], "lrr"))
    write_text(REPO / "outputs" / "bench" / "two_click_probe.md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
