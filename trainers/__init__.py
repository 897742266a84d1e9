"""The OSR trainer: a few plain functions over a config, BackMix stream in, open-set metrics out."""
from .config import TrainConfig
from .metrics import auroc, fpr_at_tpr, open_set_metrics, oscr
from .train import evaluate, evaluate_checkpoint, main, train_one_epoch

__all__ = ["TrainConfig", "auroc", "evaluate", "evaluate_checkpoint", "fpr_at_tpr", "main",
           "open_set_metrics", "oscr", "train_one_epoch"]
