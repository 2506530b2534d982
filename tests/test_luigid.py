"""Several luigi worker processes under a real central scheduler (luigid on a loopback port) share one outputs
root: every task runs exactly once (every proposal shard and every CAM shard), shards spread over the workers, and
the results equal a one-worker run."""
import re
import subprocess
from collections import Counter

import pytest

import harness as H

pytestmark = pytest.mark.slow  # luigid and luigi worker subprocesses

N_SHARDS = 4  # = harness.TINY: the one-worker reference is shared with the other test modules
WORKERS = 4
CAM_SHARDS = 4  # GenerateCAMs' default --cam-shards
CAM_STORES = 1  # one GenerateCAMs (all of TUNED.cam_layers["efficientnet_lite0"] in one pass)
#: 8 trainval images in CAM parts of 2: one part for each CAM shard (with the default 64 one shard gets all)
CAM = {"cam_images_per_part": 2}


def reference(tmp_path):
    """``(outputs, data root)`` of a one-worker run (local scheduler) of the tiny job with :data:`CAM`; the shared
    harness reference when its configuration already has these values."""
    if all(H.TINY.get(k.replace("_", "-")) == v for k, v in CAM.items()):
        return H.reference_run()
    outputs, data = tmp_path / "out-1worker", tmp_path / "data-1"
    res = H.run_luigi("PseudoLabels", H.tiny_args(data, **CAM), outputs, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return outputs, data


def test_gpu_stages_declare_a_per_host_resource():
    import tasks.main  # noqa: F401  (registers every stage)
    from tasks.base import gpu_resource
    from tasks.cams import GenerateCAMs, GenerateCAMsShard
    from tasks.classifier import TrainClassifier
    from tasks.proposals import SelectiveSearchShard

    assert TrainClassifier().resources == {gpu_resource(): 1}
    assert GenerateCAMsShard().resources == {gpu_resource(): 1}
    assert SelectiveSearchShard().resources == {}  # CPU stages never wait for the GPU
    assert GenerateCAMs().resources == {}  # merging the CAM shards' parts needs no GPU
    try:
        from tasks.detector import EvaluateVOC07, TrainFastRCNN
    except ImportError:  # detector stage not present in this checkout
        return
    assert TrainFastRCNN.uses_gpu and EvaluateVOC07.uses_gpu


def test_four_worker_processes_under_luigid_equal_one_worker(tmp_path):
    ref, ref_data = reference(tmp_path)  # one worker, local scheduler
    multi = tmp_path / "out-4workers"
    args = H.tiny_args(tmp_path / "data-4", ss_shards=N_SHARDS, **CAM)
    logs = [tmp_path / f"worker{i}.log" for i in range(WORKERS)]
    with H.luigid(tmp_path / "luigid") as port:
        procs = []
        try:
            for log in logs:
                with log.open("w") as f:
                    procs.append(subprocess.Popen(H.luigi_cmd("PseudoLabels", args, port=port), cwd=H.REPO,
                                                  env=H.pipeline_env(multi), stdout=f, stderr=subprocess.STDOUT))
            rcs = [p.wait(timeout=240) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
    texts = [log.read_text() for log in logs]
    assert all(rc in H.SHARED_GRAPH_OK for rc in rcs), (rcs, "\n----\n".join(t[-2000:] for t in texts))
    assert not any(re.search(r"\* \d+ failed", t) for t in texts)

    runs = [r for t in texts for r in H.task_runs(t)]
    per_task = Counter((fam, params) for _, fam, params in runs)
    families = Counter(fam for fam, _ in per_task)
    # every task of the graph ran exactly once over the four processes
    assert all(n == 1 for n in per_task.values()), [k for k, n in per_task.items() if n > 1]
    assert families == {"PrepareDataset": 1, "SelectiveSearchShard": N_SHARDS, "SelectiveSearch": 1,
                        "SelectProposals": 1, "TrainClassifier": 1, "GenerateCAMsShard": CAM_STORES * CAM_SHARDS,
                        "GenerateCAMs": CAM_STORES, "FusePseudoBoxes": 1, "PseudoLabels": 1}, families
    shards = sorted(int(p.split(" ss_shard=")[1].split(",")[0]) for _, fam, p in runs if fam == "SelectiveSearchShard")
    assert shards == list(range(N_SHARDS))
    cam_shards = sorted(int(p.split("cam_shard=")[1].split(",")[0]) for _, fam, p in runs
                        if fam == "GenerateCAMsShard")
    assert cam_shards == sorted(list(range(CAM_SHARDS)) * CAM_STORES)  # each CAM shard ran once
    shard_pids = {pid for pid, fam, _ in runs if fam == "SelectiveSearchShard"}
    assert len(shard_pids) >= 2, "the proposal shards all ran in one worker process"
    assert len({pid for pid, _, _ in runs}) >= 2
    # every CAM shard computed its own part of 2 images, and GenerateCAMs published them together
    cams = [d for d in H.stage_dirs(multi) if d.parent.name == "GenerateCAMs"]
    cam_parts = sorted(p.name for d in H.stage_dirs(multi) if d.parent.name == "GenerateCAMsShard"
                       for p in d.glob("cams-*.h5"))
    assert cam_parts == sorted([f"cams-{i:05d}.h5" for i in range(CAM_SHARDS)] * CAM_STORES)
    assert len(cams) == CAM_STORES
    assert sorted(p.name for d in cams for p in d.glob("cams-*.h5")) == cam_parts

    # the graph is complete: one more run (any worker) finds nothing to do
    again = H.run_luigi("PseudoLabels", args, multi, timeout=120)
    assert again.returncode == 0 and not H.task_runs(again.stderr), again.stderr[-2000:]
    assert H.incomplete_outputs(multi) == []
    assert not list(multi.glob("*/*.partial")), "a work directory was left behind"
    a = H.products(ref, [ref_data])
    b = H.products(multi, [tmp_path / "data-4"])
    assert len(a) > 20 and any(k.endswith("pseudo_labels.csv") for k in a)
    assert H.diff_products(a, b) == []
