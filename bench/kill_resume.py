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
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import harness as H  # noqa: E402

#: the stages in the order one worker runs them, the CAM shard tasks before GenerateCAMs
STAGES = tuple(H.STAGES)
if "GenerateCAMsShard" not in STAGES:
    _i = STAGES.index("GenerateCAMs")
    STAGES = (*STAGES[:_i], "GenerateCAMsShard", *STAGES[_i:])


def stage_seconds(outputs: Path) -> dict[str, float]:
    """Run time of each stage in a finished one-worker run: the longest of its directories, or for the shard
    stages, which one worker runs one after another, all shards together (so a kill's random moment falls
    anywhere in the sequence of shards, often after some have finished)."""
    out = H.stage_seconds(outputs)
    for stage in out:
        if stage.endswith("Shard"):
            out[stage] = sum(json.loads((d / "params.json").read_text()).get("seconds", 0.0)
                             for d in H.stage_dirs(outputs) if d.parent.name == stage)
    return out


def published(outputs: Path) -> dict[str, int]:
    """``{"<Stage>/<hash>": mtime of its params.json}`` of every published directory."""
    out = {}
    for d in H.stage_dirs(outputs):
        try:
            out[f"{d.parent.name}/{d.name}"] = (d / "params.json").stat().st_mtime_ns
        except OSError:
            pass
    return out


def kill_each_stage(outputs: Path, data_root: Path, rng: random.Random, durations: dict[str, float],
                    timeout: float = 300) -> list[dict]:
    """As :func:`harness.kill_each_stage` (over :data:`STAGES`), also recording what was published at each kill;
    the last record is the final run's, with ``recomputed``: directories published before some kill whose
    ``params.json`` changed by the end."""
    cmd = H.luigi_cmd("PseudoLabels", H.tiny_args(data_root))
    env = H.pipeline_env(outputs)
    records, before = [], {}
    for stage in STAGES:
        delay = rng.uniform(0.0, 0.9 * max(durations.get(stage, 0.05), 0.01))
        res = H.kill_in_stage(cmd, env, outputs, stage, delay, timeout=timeout)
        if not res["killed"] and res["rc"] != 0:
            raise RuntimeError(f"run before the kill in {stage} failed ({res['rc']}):\n{res['log'][-3000:]}")
        now = published(outputs)
        before.update({k: v for k, v in now.items() if k not in before})
        # in the stage: its work directory existed at the kill; for shard stages, any shard's (the harness looks
        # only at the first shard's, which may have been published by then)
        left = sorted(p.name for p in outputs.glob(f"{stage}/*.partial")) if res["killed"] else []
        records.append({"stage": stage, "delay": round(delay, 3), "killed": res["killed"],
                        "in_stage": res["in_stage"] or bool(left), "work_dirs_left": left,
                        "incomplete": H.incomplete_outputs(outputs), "published": sorted(now)})
    final = subprocess.run(cmd, cwd=H.REPO, env=env, capture_output=True, text=True, timeout=timeout)
    end = published(outputs)
    records.append({"stage": "<final>", "rc": final.returncode, "log": final.stderr[-3000:],
                    "incomplete": H.incomplete_outputs(outputs),
                    "leftover_partial": sorted(str(p.relative_to(outputs)) for p in outputs.glob("*/*.partial")),
                    "recomputed": sorted(k for k, t in before.items() if end.get(k) != t)})
    return records


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
    durations = stage_seconds(ref)
    print(f"reference run: {len(want)} product files, stage seconds "
          + ", ".join(f"{k} {v:.2f}" for k, v in durations.items()), flush=True)
    table = defaultdict(lambda: {"kills": 0, "in_stage": 0, "survived": 0, "differed": 0, "recomputed": 0})
    bad = 0
    dump = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="clickscale-kill-") as tmp:
            outputs, data = Path(tmp) / "outputs", Path(tmp) / "data"
            records = kill_each_stage(outputs, data, random.Random(seed), durations=durations)
            *kills, final = records
            diff = H.diff_products(want, H.products(outputs, [data])) if final["rc"] == 0 else ["<final run failed>"]
            final_ok = final["rc"] == 0 and not final["incomplete"] and not final["leftover_partial"]
            for r in kills:
                row = table[r["stage"]]
                row["kills"] += int(r["killed"])
                row["in_stage"] += int(r["in_stage"])
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
