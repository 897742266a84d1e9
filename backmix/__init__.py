"""backmix: fast data loading for open-set recognition with the BackMix regularizer.

In a training script::

    import backmix
    data = backmix.open_set_data("data/digits", split=0)
    train = backmix.loader(data, cache="runs/cache")        # the BackMix stream of the known classes
    with backmix.rebuilding(train, model) as rebuild:        # next foreground maps from this epoch's CAMs
        for batch in train:                                  # (set_epoch(e) before each epoch)
            rebuild.record(batch)                            # its CAMs, before the step that trains on it
            x, y = batch.inputs()                            # clean + mixed crops, closed-set labels
    backmix.evaluate(model, backmix.loader(data, train=False), data)   # accuracy, AUROC, OSCR

The stages are subpackages, data flowing one way: ``backmix.osr_data`` (image
folders, splits) -> ``backmix.models`` (build, checkpoint, CAM heads) ->
``backmix.cam_cache`` (foreground maps) -> ``backmix.pipeline`` (loaders) ->
``backmix.trainers``. The instruments (benchmarks, the experiment, the viewer) are
``backmix.bench``, which may use every stage and which no stage imports. In the
repository each is a top-level folder, mapped under the ``backmix`` name by
pyproject's package-dir, so installing backmix adds no generic top-level packages. Every name is imported on first use:
``import backmix`` (and ``backmix --help``) does not import torch.
"""
from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # the library face (backmix/api.py)
    "open_set_data": ".api", "loader": ".api", "rebuild": ".api", "evaluate": ".api",
    # data
    "BackMixError": ".osr_data.errors", "ImageIndex": ".osr_data.index", "OpenSetSplit": ".osr_data.splits",
    "resolve_split": ".osr_data.splits", "prepare": ".osr_data.prepare",
    # the foreground cache
    "ForegroundCache": ".cam_cache.store", "init_cache": ".cam_cache.store",
    "rebuild_cache": ".cam_cache.rebuild", "rebuilding": ".api", "GenerationWriter": ".cam_cache.precompute",
    # loaders and the mix
    "BACKENDS": ".pipeline.loaders", "make_loader": ".pipeline.loaders", "LoaderConfig": ".pipeline.config",
    "BackMixBatch": ".pipeline.batch", "mix_backgrounds": ".pipeline.backmix", "top_k_mask": ".pipeline.backmix",
    # the trainer and the open-set metrics
    "TrainConfig": ".trainers.config", "train_one_epoch": ".trainers.epoch", "train": ".trainers.train:main",
    "open_set_metrics": ".trainers.metrics", "auroc": ".trainers.metrics", "oscr": ".trainers.metrics",
    "fpr_at_tpr": ".trainers.metrics",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:
    from .api import evaluate, loader, open_set_data, rebuild, rebuilding
    from .cam_cache.precompute import GenerationWriter
    from .cam_cache.rebuild import rebuild_cache
    from .cam_cache.store import ForegroundCache, init_cache
    from .osr_data.errors import BackMixError
    from .osr_data.index import ImageIndex
    from .osr_data.prepare import prepare
    from .osr_data.splits import OpenSetSplit, resolve_split
    from .pipeline.backmix import mix_backgrounds, top_k_mask
    from .pipeline.batch import BackMixBatch
    from .pipeline.config import LoaderConfig
    from .pipeline.loaders import BACKENDS, make_loader
    from .trainers.config import TrainConfig
    from .trainers.metrics import auroc, fpr_at_tpr, open_set_metrics, oscr
    from .trainers.train import main as train
    from .trainers.epoch import train_one_epoch
