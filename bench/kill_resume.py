"""Kill-and-resume benchmark: for several seeds, run the tiny PseudoLabels job and SIGKILL it once inside each
stage in turn (a random moment of the stage's usual duration), restart it each time, and compare the final
products (pseudo labels, metrics, weights, CAMs, proposals; timings and paths excluded) with an uninterrupted
run. Also checks after every kill that no published ``<Stage>/<hash>/`` directory is incomplete.

    .venv/bin/python bench/kill_resume.py [--seeds 0 1 2]

Prints one row per stage: kills, kills that landed while the stage's work directory existed, runs that
survived (no incomplete published directory, final rerun succeeded), and runs whose products differed.
Exits non-zero on any difference or incomplete directory. ~1 min per seed on 2 cores.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import harness as H  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    t0 = time.time()
    ref, ref_data = H.reference_run()
    want = H.products(ref, [ref_data])
    durations = H.stage_seconds(ref)
    print(f"reference run: {len(want)} product files, stage seconds "
          + ", ".join(f"{k} {v:.2f}" for k, v in durations.items()), flush=True)
    table = defaultdict(lambda: {"kills": 0, "in_stage": 0, "survived": 0, "differed": 0})
    bad = 0
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="clickscale-kill-") as tmp:
            outputs, data = Path(tmp) / "outputs", Path(tmp) / "data"
            records = H.kill_each_stage(outputs, data, random.Random(seed), durations=durations)
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
            if not final_ok or diff:
                bad += 1
                print(f"seed {seed}: final rc {final['rc']}, incomplete {final['incomplete']}, "
                      f"leftover {final['leftover_partial']}, differing {diff[:10]}\n{final['log'][-1500:]}")
            print(f"seed {seed}: {sum(r['killed'] for r in kills)} kills, products "
                  f"{'identical' if not diff else 'DIFFERENT'} ({time.time() - t0:.0f} s)", flush=True)
    print(f"\n{'stage':<22}{'kills':>7}{'in stage':>10}{'survived':>10}{'outputs differed':>18}")
    for stage in H.STAGES:
        r = table[stage]
        print(f"{stage:<22}{r['kills']:>7}{r['in_stage']:>10}{r['survived']:>10}{r['differed']:>18}")
    tot = {k: sum(r[k] for r in table.values()) for k in ("kills", "in_stage", "survived", "differed")}
    print(f"{'total':<22}{tot['kills']:>7}{tot['in_stage']:>10}{tot['survived']:>10}{tot['differed']:>18}")
    print(f"{len(args.seeds)} seeds in {time.time() - t0:.0f} s")
    return 1 if bad or tot["survived"] != tot["kills"] else 0


if __name__ == "__main__":
    sys.exit(main())
