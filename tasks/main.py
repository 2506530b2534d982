"""The main job: ``PseudoLabels`` runs stages 1-5 and writes a summary of where everything is.

    make pseudo-labels                       # embedded synthetic dataset
    make pseudo-labels VOC_ROOT=... CLICKS=...
"""
from __future__ import annotations

from pathlib import Path

import luigi

from pipeline.io import read_json, write_json, write_text
from pipeline.markdown import markdown_table

from .base import StageTask, inherits
from .mil import MILBoxes
from .proposal_free import ProposalFreeBoxes
from .pseudo import FusePseudoBoxes
from .relocalize import BOX_STAGES, PROPOSALS, BoxSource, RelocalizeBoxes  # noqa: F401 (the first two: re-exported)


@inherits(FusePseudoBoxes, MILBoxes, ProposalFreeBoxes, RelocalizeBoxes, without=("relocalize_round",))
class PseudoLabels(BoxSource, StageTask):
    """Stages 1-5 (dataset -> proposals -> selection -> classifier -> CAMs -> pseudo boxes; or, with
    ``--box-method mil``, dataset -> proposals (+ selection -> classifier) -> MIL boxes), then ``--relocalize-rounds``
    rounds of re-localisation by detectors trained on the boxes (tasks/relocalize.py); writes ``summary.md`` /
    ``summary.json`` pointing at the labels, the exports and the HTML report. Its hash covers ``box_method`` and the
    box stage in use (tasks/base.py), so the other method's parameters do not move it."""

    # the chain before --proposals and --relocalize-rounds existed
    unhashed_values = {"proposals": "selective_search", "relocalize_rounds": "0"}

    relocalize_rounds = luigi.IntParameter(default=0, description="rounds of re-localisation of the pseudo boxes by "
                                                                  "detectors trained on them, cross-fitted by image "
                                                                  "folds (RelocalizeBoxes; seed 001's deep MIL); 0: "
                                                                  "the pseudo-box stage's boxes")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.proposals == "none" and self.box_method != "cam":
            raise ValueError("--proposals none takes the boxes from CAMs: it needs --box-method cam")
        unused = [f"--{k.replace('_', '-')}" for k, off in (("cam_ensemble", ""), ("cam_layers", ""))
                  if getattr(self, k) != off]
        if self.box_area_prior not in ("auto", "off"):  # auto: the proposal-free stage has no threshold to choose
            unused.append("--box-area-prior")
        if self.proposals == "none" and unused:
            raise ValueError(f"--proposals none reads one network's whole-image maps (--cam-network); "
                             f"{', '.join(unused)} belong to the crop CAM stages and do not apply")
        if self.relocalize_rounds < 0:
            raise ValueError(f"--relocalize-rounds must be >= 0, got {self.relocalize_rounds}")
        if self.relocalize_rounds:
            self.requires()  # the re-localisation stages check their parameters when created: fail here, not later

    def requires(self):
        return self.boxes_of_round(self.relocalize_rounds)

    def run_stage(self, work: Path) -> None:
        boxes_dir = self.input_dir().resolve()
        files = {
            "pseudo_labels_csv": boxes_dir / "pseudo_labels.csv",
            "voc_annotations": boxes_dir / "Annotations",
            "coco_json": boxes_dir / "coco.json",
            "metrics": boxes_dir / "metrics.json",
            "per_class": boxes_dir / "per_class.csv",
            "report": boxes_dir / "report" / "index.html",
        }
        files = {k: str(v) for k, v in files.items() if v.exists()}
        metrics = read_json(boxes_dir / "metrics.json") if (boxes_dir / "metrics.json").is_file() else {}
        chain = self.stage_chain()
        stages = stage_rows(chain)
        reloc = boxes_dir / "relocalize.json"  # --relocalize-rounds: every round's row (box-CorLoc, moved boxes)
        rounds = {"relocalize_rounds": read_json(reloc)["rounds"]} if reloc.is_file() else {}
        write_json(work / "summary.json", {"stage_dirs": chain, "files": files, "metrics": metrics,
                                           "stages": stages, **rounds})
        lines = ["# clickscale pseudo labels", ""]
        lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in files.items()]
        inner = boxes_dir / "summary.md"
        if inner.is_file():
            lines += ["", inner.read_text().strip()]
        lines += ["", stage_table(stages)]
        write_text(work / "summary.md", "\n".join(lines) + "\n")

    def stage_chain(self) -> dict:
        """Output directory of every stage this run used, upstream first (a second output of one stage, as with
        ``--cam-ensemble``, under its ``<Stage>/<hash>``)."""
        chain, task = {}, self.requires()
        todo = [task]
        while todo:
            t = todo.pop(0)
            if isinstance(t, StageTask):
                path = str(Path(t.output().path).resolve())
                key = t.task_family if chain.get(t.task_family, path) == path else t.stage_ref  # e.g. an ensemble
                chain[key] = path
                todo.extend(t.upstream())
        return dict(reversed(list(chain.items())))


def cpu_utilisation(seconds: float | None, cpu_seconds: float | None, cores: int | None) -> float | None:
    """The share of the machine a stage kept busy: its CPU time (with its child processes') / wall time / cores
    (1.0: every core busy throughout); None when a number is missing (outputs of earlier versions)."""
    if not seconds or cpu_seconds is None or not cores:
        return None
    return cpu_seconds / seconds / cores


def stage_rows(chain: dict) -> list[dict]:
    """Per stage output of ``chain`` (name -> directory): seconds, CPU seconds, the cores and peak resident memory
    from its params.json (the run that computed it; an output reused from an earlier run keeps that run's numbers),
    and the CPU utilisation (:func:`cpu_utilisation`)."""
    rows = []
    for name, path in chain.items():
        pj = Path(path) / "params.json"
        meta = read_json(pj) if pj.is_file() else {}
        rows.append({"stage": name, "seconds": meta.get("seconds"), "cpu_seconds": meta.get("cpu_seconds"),
                     "cores": meta.get("cores"),
                     "cpu_util": cpu_utilisation(meta.get("seconds"), meta.get("cpu_seconds"), meta.get("cores")),
                     "peak_rss_mb": meta.get("peak_rss_mb"),
                     "peak_rss_children_mb": meta.get("peak_rss_children_mb"), "finished": meta.get("finished")})
    return rows


def stage_table(rows: list[dict]) -> str:
    """Markdown table of :func:`stage_rows`' rows, in the order the stages finished (summary.json keeps the
    graph's order, which does not depend on the run)."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    return markdown_table(
        ["stage", "seconds", "CPU util % (CPU s / s / cores)", "peak RSS MB", "peak RSS of child processes MB",
         "finished"],
        [(r["stage"], fmt(r["seconds"], ".1f"), fmt(None if r.get("cpu_util") is None else 100 * r["cpu_util"], ".0f"),
          fmt(r["peak_rss_mb"], ".0f"), fmt(r["peak_rss_children_mb"], ".0f"), r["finished"] or "-")
         for r in sorted(rows, key=lambda r: (r["finished"] is None, r["finished"] or ""))], "lrrrrl")
