"""Kill-and-resume, reduced form (bench/kill_resume.py runs several seeds): the tiny PseudoLabels job is SIGKILLed
once inside each stage in turn (the proposal and CAM shard tasks included) and restarted; no published directory
is ever incomplete, and the final products (pseudo labels, metrics, every stage's result files) equal an
uninterrupted run's."""
import random

import pytest

import harness as H

pytestmark = pytest.mark.slow  # luigi subprocess runs (harness.reference_run, kill_each_stage)


def stages_with_cam_shards(stages=H.STAGES) -> tuple[str, ...]:
    """The stages in the order one worker runs them, GenerateCAMsShard before GenerateCAMs."""
    if "GenerateCAMsShard" in stages:
        return tuple(stages)
    i = list(stages).index("GenerateCAMs")
    return (*stages[:i], "GenerateCAMsShard", *stages[i:])


STAGES = stages_with_cam_shards()


def test_sigkill_inside_each_stage_then_resume_gives_identical_results(tmp_path):
    ref, ref_data = H.reference_run()
    outputs, data = tmp_path / "outputs", tmp_path / "data"
    records = H.kill_each_stage(outputs, data, random.Random(0), stages=STAGES, durations=H.stage_seconds(ref))
    *kills, final = records
    assert [r["stage"] for r in kills] == list(STAGES)
    for r in kills:
        assert r["incomplete"] == [], r
    # every run was killed before it finished (the last, 20 ms stage may end before the signal)
    assert all(r["killed"] for r in kills[:-1]), kills
    # most kills land while the stage's work directory exists (a tiny stage may publish first; the kill then
    # lands in a later one)
    assert sum(r["in_stage"] for r in kills) >= len(STAGES) // 2, kills
    assert final["rc"] == 0, final["log"]
    assert final["incomplete"] == [] and final["leftover_partial"] == []
    a, b = H.products(ref, [ref_data]), H.products(outputs, [data])
    assert any(k.endswith("pseudo_labels.csv") for k in a) and any(k.endswith("metrics.json") for k in a)
    assert H.diff_products(a, b) == []
    # the CAM shards' outputs are among the compared products (4 shards, GenerateCAMs' default --cam-shards, each
    # computing both default CAM layers, tasks.defaults.TUNED.cam_layers, in one pass)
    assert len({k.split("/")[1] for k in a if k.startswith("GenerateCAMsShard/")}) == 4


def test_products_digest_detects_a_changed_box(tmp_path):
    """The comparison above can fail: one pseudo-box coordinate changed by a pixel changes the digest."""
    import shutil

    ref, ref_data = H.reference_run()
    copy = tmp_path / "outputs"
    shutil.copytree(ref, copy)
    (fuse,) = [d for d in H.stage_dirs(copy) if d.parent.name == "FusePseudoBoxes"]
    before = H.products(copy, [ref, ref_data])
    labels = H.pseudo_labels(copy)
    labels.loc[0, "x2"] = labels.loc[0, "x2"] - 1
    labels.to_csv(fuse / "pseudo_labels.csv", index=False)
    diff = H.diff_products(before, H.products(copy, [ref, ref_data]))
    assert diff == [f"FusePseudoBoxes/{fuse.name}/pseudo_labels.csv"]
    # and a published directory that lost a file is reported
    (fuse / "coco.json").unlink()
    assert H.incomplete_outputs(copy) == [f"FusePseudoBoxes/{fuse.name}: no coco.json"]
