"""The OSR trainer: a few plain functions over a config, BackMix stream in, open-set metrics out."""
from typing import TYPE_CHECKING

from backmix._lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": ".config", "auroc": ".metrics", "fpr_at_tpr": ".metrics", "open_set_metrics": ".metrics",
    "oscr": ".metrics", "evaluate": ".train", "evaluate_checkpoint": ".train", "main": ".train",
    "train_one_epoch": ".train",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:
    from .config import TrainConfig
    from .metrics import auroc, fpr_at_tpr, open_set_metrics, oscr
    from .train import evaluate, evaluate_checkpoint, main, train_one_epoch
