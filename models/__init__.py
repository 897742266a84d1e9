"""The models stage: build any supported classifier, checkpoint it, and expose its CAM head.

Data flow: ``osr_data -> models -> cam_cache -> pipeline -> trainers``. This package
imports only ``backmix.osr_data`` (errors) and ``backmix._fs`` (atomic writes); the cache and the trainer
import it, never the other way round.

* ``build_model(arch, num_classes)``: ``cnn32``; ``wrnDEPTH_WIDTH`` (the WideResNet of
  the OSR literature at 32 px, e.g. ``wrn40_4``); any torchvision classification model
  by name (``resnet50``, ``regnet_y_800mf``, ``efficientnet_b0``, ``convnext_tiny``, ...);
  ``timm:NAME`` for a timm model. Always random weights: nothing is downloaded.
* ``save_checkpoint`` / ``load_model``: a checkpoint records the arch string, so
  ``load_model`` rebuilds whatever model wrote it. Loading never unpickles anything but
  tensors and plain values; ``save_safetensors`` writes weights with no pickle at all.
* ``features_and_head(model)``: the one thing the cache needs of a model, the protocol
  "``features(x) -> [B, C, h, w]``, ``head: nn.Linear``" with
  ``logits = head(mean over h, w of features(x))`` (up to a per-image positive scale and
  shift, which the CAM's min-max scaling removes; see ``cam.py``). One adapter per
  family; a model whose head is not of that form is refused with one line.
"""
from typing import TYPE_CHECKING

from backmix._lazy import lazy_exports

_EXPORTS = {
    "features_and_head": ".cam",
    "load_model": ".checkpoint", "read_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint", "save_safetensors": ".checkpoint",
    "Classifier32": ".nets", "WideResNet": ".nets",
    "ARCH_HELP": ".zoo", "build_model": ".zoo", "check_arch": ".zoo", "unwrap": ".zoo",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

if TYPE_CHECKING:
    from .cam import features_and_head
    from .checkpoint import load_model, read_checkpoint, save_checkpoint, save_safetensors
    from .nets import Classifier32, WideResNet
    from .zoo import ARCH_HELP, build_model, check_arch, unwrap
