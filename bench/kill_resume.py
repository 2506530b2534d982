"""Kill-and-resume benchmark: for several seeds, run the tiny PseudoLabels job and SIGKILL it once inside each
stage in turn (a random moment of the stage's usual duration), restart it each time, and compare the final
products (pseudo labels, metrics, weights, CAMs, proposals; timings and paths excluded) with an uninterrupted
run. Also checks after every kill that no published ``<Stage>/<hash>/`` directory is incomplete, and that every
directory published before a kill is kept as it was to the end (a killed shard reruns alone; finished shards are
not recomputed).

    .venv/bin/python bench/kill_resume.py [--seeds 0 1 2] [--cam-images-per-part 2]

The stages include the shard tasks (``SelectiveSearchShard``, ``GenerateCAMsShard``); with CAM parts of 2 images
the 8 trainval images make 4 parts, one per CAM shard (GenerateCAMs' default ``--cam-shards 4``), so a kill in
the CAM shard stage lands while some shards are finished and others are not.

Prints one row per stage: kills, kills that landed while the stage's work directory existed, runs that
survived (no incomplete published directory, final rerun succeeded), runs whose products differed, and
published directories recomputed after a kill (should be 0). Exits non-zero on any difference, incomplete or
recomputed directory. Time per seed: docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# the kill/compare machinery is the test suite's (tests/harness.py, also used by tests/test_kill_resume.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import harness as H  # noqa: E402

#: the stages in the order one worker runs them, the shard tasks included
STAGES = tuple(H.STAGES)
assert "GenerateCAMsShard" in STAGES and "SelectiveSearchShard" in STAGES, STAGES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cam-images-per-part", type=int, default=2,
                    help="CAM part size of the tiny job (2: one part per CAM shard)")
    ap.add_argument("--json", type=Path, default=None, help="also write the per-seed records here")
    args = ap.parse_args(argv)
    # this process's tiny configuration (the reference and every killed run use it)
    H.TINY["cam-images-per-part"] = args.cam_images_per_part
    t0 = time.time()
    ref, ref_data = H.reference_run()
    want = H.products(ref, [ref_data])
    durations = H.stage_seconds(ref, sum_shards=True)
    print(f"reference run: {len(want)} product files, stage seconds "
          + ", ".join(f"{k} {v:.2f}" for k, v in durations.items()), flush=True)
    table = defaultdict(lambda: {"kills": 0, "in_stage": 0, "survived": 0, "differed": 0, "recomputed": 0})
    bad = 0
    dump = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="clickscale-kill-") as tmp:
            outputs, data = Path(tmp) / "outputs", Path(tmp) / "data"
            records = H.kill_each_stage(outputs, data, random.Random(seed), stages=STAGES, durations=durations)
            *kills, final = records
            diff = H.diff_products(want, H.products(outputs, [data])) if final["rc"] == 0 else ["<final run failed>"]
            final_ok = final["rc"] == 0 and not final["incomplete"] and not final["leftover_partial"]
            for r in kills:
                row = table[r["stage"]]
                row["kills"] += int(r["killed"])
                # in the stage: its work directory existed at the kill; for shard stages, any shard's (the harness's
                # in_stage looks only at the first shard's, which may have been published by then)
                row["in_stage"] += int(r["in_stage"] or bool(r["work_dirs_left"]))
                row["survived"] += int(r["killed"] and not r["incomplete"] and final_ok)
                row["differed"] += int(bool(diff))
                if r["incomplete"]:
                    print(f"seed {seed}: after the kill in {r['stage']}: {r['incomplete']}")
            for ref_dir in final["recomputed"]:
                table[ref_dir.split("/")[0]]["recomputed"] += 1
            if not final_ok or diff or final["recomputed"]:
                bad += 1
                print(f"seed {seed}: final rc {final['rc']}, incomplete {final['incomplete']}, "
                      f"leftover {final['leftover_partial']}, recomputed {final['recomputed']}, "
                      f"differing {diff[:10]}\n{final['log'][-1500:]}")
            cam_kill = next(r for r in kills if r["stage"] == "GenerateCAMsShard")
            done_shards = sum(p.startswith("GenerateCAMsShard/") for p in cam_kill["published"])
            print(f"seed {seed}: {sum(r['killed'] for r in kills)} kills (CAM shard kill after {cam_kill['delay']} s "
                  f"with {done_shards} CAM shards published), products "
                  f"{'identical' if not diff else 'DIFFERENT'} ({time.time() - t0:.0f} s)", flush=True)
            dump.append({"seed": seed, "kills": [{k: v for k, v in r.items() if k != "log"} for r in records],
                         "differing": diff})
    print(f"\n{'stage':<22}{'kills':>7}{'in stage':>10}{'survived':>10}{'outputs differed':>18}{'recomputed':>12}")
    for stage in STAGES:
        r = table[stage]
        print(f"{stage:<22}{r['kills']:>7}{r['in_stage']:>10}{r['survived']:>10}{r['differed']:>18}"
              f"{r['recomputed']:>12}")
    tot = {k: sum(r[k] for r in table.values()) for k in ("kills", "in_stage", "survived", "differed", "recomputed")}
    print(f"{'total':<22}{tot['kills']:>7}{tot['in_stage']:>10}{tot['survived']:>10}{tot['differed']:>18}"
          f"{tot['recomputed']:>12}")
    print(f"{len(args.seeds)} seeds in {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(dump, indent=1))
    return 1 if bad or tot["survived"] != tot["kills"] else 0


if __name__ == "__main__":
    sys.exit(main())
