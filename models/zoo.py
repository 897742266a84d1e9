"""``build_model(arch, num_classes)``: one name space for every model the project trains.

``arch`` is ``cnn32``, ``wrnDEPTH_WIDTH`` (``wrn40_4``), a torchvision classification
model name, or ``timm:NAME``. Weights are always random (``weights=None``, timm
``pretrained=False``): nothing is downloaded.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from backmix.osr_data.errors import BackMixError

if TYPE_CHECKING:
    from torch import nn
# torch, torchvision and timm are imported inside the functions: `backmix --help` (which reads
# ARCH_HELP) and config validation of a name import none of them.

ARCH_HELP = ("cnn32, wrnDEPTH_WIDTH (wrn40_4: WRN-40-4), a torchvision classification model "
             "(resnet18, resnet50, wide_resnet50_2, regnet_y_800mf, efficientnet_b0, convnext_tiny, "
             "vit_b_16, ...) or timm:NAME (NAME alone where torchvision has no such model: "
             "vit_small_patch16_224, deit_tiny_patch16_224, swin_tiny_patch4_window7_224, ...)")
_WRN = re.compile(r"wrn(\d+)_(\d+)")
# Auxiliary heads would turn the training output into a tuple; init_weights=False: torch's default
# initialisation instead of the slow truncated normal (and torchvision's FutureWarning about it).
_TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": False},
                       "inception_v3": {"aux_logits": False, "init_weights": False}}


def _torchvision_names() -> list[str]:
    import torchvision.models
    return torchvision.models.list_models(module=torchvision.models)   # classification only


def check_arch(arch: str) -> str:
    """``arch`` if it names a model ``build_model`` can make, else a BackMixError (without building it)."""
    wrn = _WRN.fullmatch(arch)
    if arch == "cnn32" or arch in _torchvision_names():
        return arch
    if wrn:
        depth, widen = int(wrn[1]), int(wrn[2])
        if depth < 10 or (depth - 4) % 6 or widen < 1:
            raise BackMixError(f"model {arch!r}: a WideResNet needs depth 6n+4 >= 10 and width >= 1 "
                               "(wrn40_4, wrn28_10, ...)")
        return arch
    if arch.startswith("timm:"):
        import timm
        if not timm.is_model(arch[5:]):
            raise BackMixError(f"model {arch!r}: timm has no model {arch[5:]!r} (see timm.list_models())")
        return arch
    if _timm_only(arch):
        return arch
    raise BackMixError(f"unknown model {arch!r} (give {ARCH_HELP})")


def _timm_only(arch: str) -> bool:
    """Whether ``arch`` names a timm model that torchvision does not have (vit_small_patch16_224,
    deit_tiny_patch16_224, swin_tiny_patch4_window7_224): it may be given without ``timm:``."""
    import timm
    return arch not in _torchvision_names() and timm.is_model(arch)


def build_model(arch: str, num_classes: int, *, image_size: int | None = None, **kwargs) -> "nn.Module":
    """A freshly initialised ``arch`` with a ``num_classes``-way head; ``kwargs`` go to its constructor
    (``width`` for cnn32). ``image_size``: the input side, for the models built for one size (torchvision
    ViT and MaxViT, timm models with a fixed input size); the others take any size and ignore it."""
    from .nets import Classifier32, WideResNet
    check_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise BackMixError(f"num_classes must be a whole number >= 1, got {num_classes!r}")
    if "width" in kwargs and not (isinstance(kwargs["width"], (int, float)) and kwargs["width"] > 0):
        raise BackMixError(f"width must be a number > 0, got {kwargs['width']!r}")
    if arch == "cnn32":
        return Classifier32(num_classes, **kwargs)
    wrn = _WRN.fullmatch(arch)
    if wrn:
        return WideResNet(num_classes, depth=int(wrn[1]), widen=int(wrn[2]), **kwargs)
    if not arch.startswith("timm:") and arch not in ("cnn32",) and not wrn and _timm_only(arch):
        arch = "timm:" + arch
    try:
        if arch.startswith("timm:"):
            import timm
            from timm.models import get_pretrained_cfg_value
            if image_size and get_pretrained_cfg_value(arch[5:], "fixed_input_size"):
                kwargs = {"img_size": image_size, **kwargs}
            return timm.create_model(arch[5:], pretrained=False, num_classes=num_classes, **kwargs)
        import torchvision.models
        if image_size and arch.startswith("vit_"):
            kwargs = {"image_size": image_size, **kwargs}
        elif image_size and arch.startswith("maxvit_"):
            kwargs = {"input_size": (image_size, image_size), **kwargs}
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes,
                                            **{**_TORCHVISION_KWARGS.get(arch, {}), **kwargs})
    except (AssertionError, TypeError, ValueError) as e:   # a size or option the model's constructor refuses
        raise BackMixError(f"cannot build {arch}" + (f" for {image_size} px inputs" if image_size else "")
                           + f": {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def unwrap(model):
    """The model itself, out of the wrapper that holds it as ``.module`` (DistributedDataParallel, an
    EMA of its weights): the weights to save, evaluate and take CAMs with."""
    return getattr(model, "module", model)
