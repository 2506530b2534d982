"""Luigi tasks of clickscale (parameters, requires, output, and a run() that calls pipeline/).

    PrepareDataset -> SelectiveSearch(+Shards) -> SelectProposals -> TrainClassifier -> GenerateCAMs(+Shards)
                   -> FusePseudoBoxes -> PseudoLabels -> TrainFastRCNN -> EvaluateVOC07
    PrepareDataset -> SelectiveSearch + TrainClassifier -> MILBoxes -> PseudoLabels (--box-method mil)
    pseudo boxes -> RelocalizeDetector (one per fold) -> RelocalizeBoxes, per round -> PseudoLabels
        (--relocalize-rounds N)
    TrainFastRCNN (or --detect-model) -> Detect (a folder of new images)
    PrepareDataset -> TrainClassifier (image labels) -> ProposalFreeBoxes -> PseudoLabels (--proposals none)
    PrepareDataset -> TrainClassifier (image labels) -> ImageExtentBoxes (no clicks; seeds 003 / 004)
    SelectProposals -> BackgroundSet -> TrainBC -> BCMaps -> FusePseudoBoxes (seed 002: --box-bc-mask on;
                                               TrainBC -> TrainClassifier with --classifier-ct-weight)

``luigi --module tasks <Task> --local-scheduler`` from the repository root.
"""
from .base import StageTask, invalidate  # noqa: F401
from .dataset import PrepareDataset  # noqa: F401
from .proposals import SelectiveSearch, SelectiveSearchShard, SelectProposals  # noqa: F401
from .bcct import BackgroundSet, BCMaps, TrainBC  # noqa: F401
from .classifier import TrainClassifier  # noqa: F401
from .cams import GenerateCAMs, GenerateCAMsShard  # noqa: F401
from .pseudo import FusePseudoBoxes  # noqa: F401
from .mil import MILBoxes  # noqa: F401
from .proposal_free import ImageExtentBoxes, ProposalFreeBoxes  # noqa: F401
from .main import PseudoLabels  # noqa: F401
from .detector import EvaluateVOC07, TrainFastRCNN  # noqa: F401
from .relocalize import RelocalizeBoxes, RelocalizeDetector  # noqa: F401
from .detect import Detect  # noqa: F401
