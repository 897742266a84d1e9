"""The OSR trainer: a few plain functions over a config, BackMix stream in, open-set metrics out."""
from typing import TYPE_CHECKING

from backmix._lazy import lazy_exports

_EXPORTS = {
    "TrainConfig": ".config", "auroc": ".metrics", "fpr_at_tpr": ".metrics", "open_set_metrics": ".metrics",
    "oscr": ".metrics", "evaluate": ".epoch", "evaluate_checkpoint": ".eval_checkpoint", "main": ".train",
    "train_one_epoch": ".epoch",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:
    from .config import TrainConfig
    from .metrics import auroc, fpr_at_tpr, open_set_metrics, oscr
    from .epoch import evaluate, train_one_epoch
    from .eval_checkpoint import evaluate_checkpoint
    from .train import main
