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

#: the pseudo-box stage of each ``--box-method``
BOX_STAGES = {"cam": FusePseudoBoxes, "mil": MILBoxes}
#: ``--proposals``: selective_search (the chain above) or none (whole-image CAMs, tasks/proposal_free.py)
PROPOSALS = ("selective_search", "none")


@inherits(FusePseudoBoxes, MILBoxes, ProposalFreeBoxes)
class PseudoLabels(StageTask):
    """Stages 1-5 (dataset -> proposals -> selection -> classifier -> CAMs -> pseudo boxes; or, with
    ``--box-method mil``, dataset -> proposals (+ selection -> classifier) -> MIL boxes); writes ``summary.md`` /
    ``summary.json`` pointing at the labels, the exports and the HTML report. Its hash covers ``box_method`` and the
    box stage in use (tasks/base.py), so the other method's parameters do not move it."""

    unhashed_values = {"proposals": "selective_search"}  # the chain before --proposals existed

    box_method = luigi.ChoiceParameter(choices=list(BOX_STAGES), default="cam",
                                       description="cam: SA-CAM boxes (FusePseudoBoxes, the default); mil: "
                                                   "click-supervised MIL (MILBoxes, paper 001)")

    proposals = luigi.ChoiceParameter(choices=list(PROPOSALS), default="selective_search",
                                      description="none: no selective search and no stage 2; each click's box from "
                                                  "the whole-image map of its class (ProposalFreeBoxes, "
                                                  "--cam-network), with --box-method cam")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.proposals == "none" and self.box_method != "cam":
            raise ValueError("--proposals none takes the boxes from CAMs: it needs --box-method cam")
        unused = [f"--{k.replace('_', '-')}" for k, off in (("cam_ensemble", ""), ("cam_layers", ""),
                                                            ("box_area_prior", "off")) if getattr(self, k) != off]
        if self.proposals == "none" and unused:
            raise ValueError(f"--proposals none reads one network's whole-image maps (--cam-network); "
                             f"{', '.join(unused)} belong to the crop CAM stages and do not apply")

    def requires(self):
        if self.proposals == "none":
            return self.clone(ProposalFreeBoxes)
        return self.clone(BOX_STAGES[self.box_method])

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
        write_json(work / "summary.json", {"stage_dirs": chain, "files": files, "metrics": metrics,
                                           "stages": stages})
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
