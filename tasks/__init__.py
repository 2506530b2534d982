"""Luigi tasks of clickscale (parameters, requires, output, and a run() that calls pipeline/).

    PrepareDataset -> SelectiveSearch -> SelectProposals -> TrainClassifier -> GenerateCAMs
                   -> FusePseudoBoxes -> PseudoLabels -> TrainFastRCNN -> EvaluateVOC07

``luigi --module tasks <Task> --local-scheduler`` from the repository root.
"""
from .base import StageTask, invalidate  # noqa: F401
from .dataset import PrepareDataset  # noqa: F401
from .proposals import SelectiveSearch, SelectiveSearchShard, SelectProposals  # noqa: F401
