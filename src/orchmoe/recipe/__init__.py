"""The training recipe and the command line, thin on top of the library: options, the run folder,
the training loop, evaluation, reports and routing analyses.

Import the analysis from `orchmoe.recipe.analysis` (it needs matplotlib and scipy).
"""

from orchmoe.recipe.evaluate import evaluate_model, evaluate_run, generate_predictions
from orchmoe.recipe.options import TrainConfig, TrainConfigError, load_config_file
from orchmoe.recipe.report import build_report, write_report
from orchmoe.recipe.run_folder import RunFolder
from orchmoe.recipe.trainer import Trainer, train

__all__ = [
    "RunFolder",
    "TrainConfig",
    "TrainConfigError",
    "Trainer",
    "build_report",
    "evaluate_model",
    "evaluate_run",
    "generate_predictions",
    "load_config_file",
    "train",
    "write_report",
]
