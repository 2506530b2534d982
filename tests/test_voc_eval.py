"""VOC2007 AP on hand-built cases with known AP, and against an independent re-implementation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.voc_eval import (evaluate_detections, match_class, plot_pr_curves, read_voc_results,
                               read_voc_results_dir, results_filename, voc_ap, write_voc_results)

CLASSES = ("cat", "dog", "cow")


def gt(rows):
    """rows: (image_id, class, x1, y1, x2, y2, difficult)."""
    return pd.DataFrame(rows, columns=["image_id", "class", "x1", "y1", "x2", "y2", "difficult"])


def dets(rows):
    """rows: (image_id, class, score, x1, y1, x2, y2)."""
    return pd.DataFrame(rows, columns=["image_id", "class", "score", "x1", "y1", "x2", "y2"])


def test_tp_fp_and_11_point_ap_by_hand():
    objects = gt([("a", "cat", 10, 10, 50, 50, 0), ("b", "cat", 0, 0, 100, 80, 0)])
    d = dets([("a", "cat", 0.9, 11, 11, 50, 50),     # TP
              ("a", "cat", 0.8, 60, 60, 90, 90),     # FP: no overlap
              ("b", "cat", 0.7, 0, 0, 100, 70)])     # TP: IoU 0.875
    table, m = evaluate_detections(d, objects, ["cat"])
    r = table.set_index("class").loc["cat"]
    # recall .5 .5 1, precision 1 .5 2/3: thresholds 0..0.5 see precision 1, 0.6..1 see 2/3
    assert r.ap == pytest.approx((6 * 1.0 + 5 * (2 / 3)) / 11)
    assert (r.n_gt, r.n_det, r.n_tp, r.n_fp) == (2, 3, 2, 1)
    assert m == pytest.approx(r.ap)
    # all-point AP: 0.5 * 1 + 0.5 * 2/3
    table2, _ = evaluate_detections(d, objects, ["cat"], use_07_metric=False)
    assert table2.ap[0] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_duplicates_are_false_positives_and_order_is_by_score():
    objects = gt([("a", "dog", 0, 0, 40, 40, 0), ("a", "dog", 100, 100, 140, 140, 0)])
    # given out of order: the 0.95 detection matches first, the 0.9 duplicate is an FP
    d = dets([("a", "dog", 0.9, 1, 1, 40, 40), ("a", "dog", 0.95, 0, 0, 40, 40),
              ("a", "dog", 0.5, 100, 100, 140, 141)])
    _, _, curves = evaluate_detections(d, objects, ["dog"], return_curves=True)
    r = curves["dog"]
    np.testing.assert_array_equal(r.scores, [0.95, 0.9, 0.5])
    np.testing.assert_array_equal(r.tp, [1, 0, 1])
    np.testing.assert_array_equal(r.fp, [0, 1, 0])
    # recall .5 .5 1, precision 1 .5 2/3 -> same AP as above
    assert r.ap == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_difficult_objects_are_neither_tp_nor_fp():
    objects = gt([("a", "cat", 0, 0, 50, 50, 0), ("a", "cat", 200, 200, 260, 260, 1)])
    d = dets([("a", "cat", 0.9, 200, 200, 260, 260),   # on the difficult object: ignored
              ("a", "cat", 0.85, 201, 201, 260, 260),  # a second one on it: also ignored (not a duplicate FP)
              ("a", "cat", 0.8, 0, 0, 50, 50)])        # TP
    table, _, curves = evaluate_detections(d, objects, ["cat"], return_curves=True)
    r = curves["cat"]
    assert (r.n_gt, r.n_difficult) == (1, 1)
    np.testing.assert_array_equal(r.tp, [0, 0, 1])
    np.testing.assert_array_equal(r.fp, [0, 0, 0])
    assert r.ap == pytest.approx(1.0)  # counted as FPs it would be 1/3
    # only-difficult ground truth of a class: no positives -> NaN, and detections on it do not matter
    objects2 = gt([("a", "cat", 0, 0, 50, 50, 1)])
    t2, m2 = evaluate_detections(dets([("a", "cat", 0.9, 0, 0, 50, 50)]), objects2, ["cat"])
    assert np.isnan(t2.ap[0]) and np.isnan(m2)


def test_best_overlap_difficult_hides_a_normal_object():
    # devkit quirk: the detection is assigned to its best-IoU ground truth; when that one is difficult, the
    # detection is ignored even though it also overlaps a normal object by more than 0.5
    objects = gt([("a", "cat", 0, 0, 100, 100, 0), ("a", "cat", 0, 0, 100, 90, 1)])
    d = dets([("a", "cat", 0.9, 0, 0, 100, 91)])  # IoU .91 with the normal one, .989 with the difficult one
    _, _, curves = evaluate_detections(d, objects, ["cat"], return_curves=True)
    assert curves["cat"].tp.sum() == 0 and curves["cat"].fp.sum() == 0
    assert curves["cat"].ap == 0.0


def test_iou_threshold_is_strict():
    objects = gt([("a", "cow", 0, 0, 10, 10, 0)])
    exactly_half = dets([("a", "cow", 0.9, 0, 0, 10, 5)])  # IoU 50/100 = 0.5 exactly -> FP
    t, _ = evaluate_detections(exactly_half, objects, ["cow"])
    assert (t.n_tp[0], t.n_fp[0], t.ap[0]) == (0, 1, 0.0)
    above = dets([("a", "cow", 0.9, 0, 0, 10, 5.1)])  # IoU 0.51 -> TP
    t, _ = evaluate_detections(above, objects, ["cow"])
    assert (t.n_tp[0], t.ap[0]) == (1, pytest.approx(1.0))


def test_no_detections_and_absent_class():
    objects = gt([("a", "cat", 0, 0, 50, 50, 0), ("b", "dog", 0, 0, 30, 30, 0)])
    d = dets([("a", "cat", 0.9, 0, 0, 50, 50),
              ("b", "cow", 0.8, 0, 0, 30, 30)])  # cow is absent from the test set
    table, m = evaluate_detections(d, objects, CLASSES)
    t = table.set_index("class")
    assert t.loc["cat", "ap"] == pytest.approx(1.0)
    assert t.loc["dog", "ap"] == 0.0 and t.loc["dog", "n_det"] == 0  # no detections: AP 0, counted in mAP
    assert np.isnan(t.loc["cow", "ap"]) and t.loc["cow", "n_gt"] == 0  # absent class: NaN, not in mAP
    assert m == pytest.approx(0.5)
    # no detections at all
    table, m = evaluate_detections(dets([]), objects, CLASSES)
    assert list(table.ap[:2]) == [0.0, 0.0] and m == 0.0


def test_detection_on_image_without_ground_truth_is_fp_and_image_set_is_checked():
    objects = gt([("a", "cat", 0, 0, 50, 50, 0)])
    d = dets([("z", "cat", 0.95, 0, 0, 50, 50), ("a", "cat", 0.9, 0, 0, 50, 50)])
    t, _ = evaluate_detections(d, objects, ["cat"], image_ids=["a", "z"])
    # precision 0 then .5 at recall 1
    assert (t.n_fp[0], t.ap[0]) == (1, pytest.approx(0.5))
    with pytest.raises(ValueError, match="not in the evaluated image set"):
        evaluate_detections(d, objects, ["cat"], image_ids=["a"])
    with pytest.raises(ValueError, match="unknown class"):
        evaluate_detections(dets([("a", "horse", 0.9, 0, 0, 5, 5)]), objects, ["cat"])
    with pytest.raises(ValueError, match="missing column"):
        evaluate_detections(d.drop(columns="score"), objects, ["cat"])


def test_voc_ap_11_point_thresholds_are_the_reference_ones():
    # recall exactly 0.3 = 3/10 does not reach np.arange's 0.30000000000000004 (py-faster-rcnn, bit for bit)
    assert voc_ap(np.array([0.3]), np.array([1.0])) == pytest.approx(3 / 11)
    assert voc_ap(np.array([0.31]), np.array([1.0])) == pytest.approx(4 / 11)
    assert voc_ap(np.array([1.0]), np.array([0.5])) == pytest.approx(0.5)
    assert voc_ap(np.array([]), np.array([])) == 0.0
    assert voc_ap(np.array([]), np.array([]), use_07_metric=False) == 0.0


# ----------------------------------------------------------------- independent re-implementation (devkit style)
def _devkit_reference(det_rows, gt_rows, cls, use_07_metric):
    """Straight port of py-faster-rcnn voc_eval.py on 1-based inclusive devkit boxes (+1 in widths)."""
    class_recs, npos = {}, 0
    for image_id in sorted({r[0] for r in gt_rows} | {r[0] for r in det_rows}):
        R = [r for r in gt_rows if r[0] == image_id and r[1] == cls]
        bbox = np.array([[r[2] + 1, r[3] + 1, r[4], r[5]] for r in R]).reshape(-1, 4)  # devkit xmin..xmax
        difficult = np.array([bool(r[6]) for r in R], dtype=bool)
        npos += int((~difficult).sum())
        class_recs[image_id] = {"bbox": bbox, "difficult": difficult, "det": [False] * len(R)}
    D = [r for r in det_rows if r[1] == cls]
    image_ids = [r[0] for r in D]
    confidence = np.array([r[2] for r in D])
    BB = np.array([[r[3] + 1, r[4] + 1, r[5], r[6]] for r in D]).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence, kind="stable")
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1., 0.)
            ih = np.maximum(iymax - iymin + 1., 0.)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.) * (bb[3] - bb[1] + 1.) +
                   (BBGT[:, 2] - BBGT[:, 0] + 1.) * (BBGT[:, 3] - BBGT[:, 1] + 1.) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > 0.5:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.
        else:
            fp[d] = 1.
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07_metric:
        ap = 0.
        for t in np.arange(0., 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.
        return ap
    mrec = np.concatenate(([0.], rec, [1.]))
    mpre = np.concatenate(([0.], prec, [0.]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def _random_case(seed):
    rng = np.random.default_rng(seed)
    gt_rows, det_rows = [], []
    for k in range(12):
        image_id = f"im{k:02d}"
        for _ in range(rng.integers(0, 4)):
            x1, y1 = rng.integers(0, 200, 2)
            w, h = rng.integers(10, 120, 2)
            cls = CLASSES[rng.integers(0, 3)]
            gt_rows.append((image_id, cls, float(x1), float(y1), float(x1 + w), float(y1 + h),
                            int(rng.random() < 0.15)))
            for _ in range(rng.integers(0, 4)):  # jittered detections: TPs, duplicates, near misses
                j = rng.integers(-12, 13, 4)
                det_rows.append((image_id, cls if rng.random() < 0.85 else CLASSES[rng.integers(0, 3)],
                                 float(np.round(rng.random(), 2)),  # rounded: ties in score happen
                                 float(x1 + j[0]), float(y1 + j[1]), float(x1 + w + j[2] + 13),
                                 float(y1 + h + j[3] + 13)))
        for _ in range(rng.integers(0, 3)):  # background false positives
            x1, y1 = rng.integers(0, 200, 2)
            det_rows.append((image_id, CLASSES[rng.integers(0, 3)], float(rng.random()), float(x1), float(y1),
                             float(x1 + 30), float(y1 + 40)))
    return gt_rows, det_rows


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("use_07", [True, False])
def test_matches_independent_devkit_port(seed, use_07):
    gt_rows, det_rows = _random_case(seed)
    table, m = evaluate_detections(dets(det_rows), gt(gt_rows), CLASSES, use_07_metric=use_07)
    aps = table.set_index("class").ap
    assert (table.n_tp > 0).any() and (table.n_fp > 0).any()
    for cls in CLASSES:
        n_pos = sum(1 for r in gt_rows if r[1] == cls and not r[6])
        if n_pos == 0:
            assert np.isnan(aps[cls])
            continue
        assert aps[cls] == pytest.approx(_devkit_reference(det_rows, gt_rows, cls, use_07), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_all_point_ap_equals_sum_over_tp_of_envelope_precision(seed):
    # all-point AP = (1/n_gt) * sum over true positives k of max(precision at ranks >= k): a second formula
    gt_rows, det_rows = _random_case(100 + seed)
    objects, d = gt(gt_rows), dets(det_rows)
    for cls in CLASSES:
        r = match_class(d, objects, cls, use_07_metric=False)
        if r.n_gt == 0:
            continue
        ctp, cfp = np.cumsum(r.tp), np.cumsum(r.fp)
        prec = ctp / np.maximum(ctp + cfp, 1e-300)
        expected = sum(prec[k:].max() for k in np.flatnonzero(r.tp)) / r.n_gt
        assert r.ap == pytest.approx(expected, abs=1e-12)
        # and the 11-point AP is the mean of the same envelope read at the first rank reaching each recall
        r07 = match_class(d, objects, cls, use_07_metric=True)
        env = [prec[np.argmax(r.recall >= t):].max() if r.recall[-1] >= t else 0.0
               for t in np.arange(0.0, 1.1, 0.1)]
        assert r07.ap == pytest.approx(np.mean(env), abs=1e-12)


def test_results_files_roundtrip_with_1_based_coordinates(tmp_path):
    d = dets([("000001", "cat", 0.9, 0.0, 0.0, 50.0, 40.0), ("000002", "cat", 0.5, 10.5, 20.0, 30.0, 99.0),
              ("000001", "dog", 0.75, 3.0, 4.0, 5.0, 6.0)])
    paths = write_voc_results(d, tmp_path, CLASSES)
    assert [p.name for p in paths] == [results_filename(c) for c in CLASSES]
    assert paths[0].name == "comp4_det_test_cat.txt"
    first = paths[0].read_text().splitlines()[0].split()
    assert first[0] == "000001" and [float(v) for v in first[2:]] == [1.0, 1.0, 50.0, 40.0]  # devkit xmin = 1
    assert paths[2].read_text() == ""  # cow: an empty file, as the devkit expects one per class
    back = read_voc_results_dir(tmp_path, CLASSES)
    pd.testing.assert_frame_equal(back.sort_values(["class", "image_id"]).reset_index(drop=True),
                                  d.sort_values(["class", "image_id"]).reset_index(drop=True), check_dtype=False)
    bad = tmp_path / "comp4_det_test_horse.txt"
    bad.write_text("000001 0.5 1 2 3\n")
    with pytest.raises(ValueError, match=r"comp4_det_test_horse.txt:1: expected 6 fields"):
        read_voc_results(bad)


def test_pr_plot_writes_png(tmp_path):
    gt_rows, det_rows = _random_case(3)
    _, _, curves = evaluate_detections(dets(det_rows), gt(gt_rows), CLASSES, return_curves=True)
    p = plot_pr_curves(curves, tmp_path / "pr.png", title="test")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
