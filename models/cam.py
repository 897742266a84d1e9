"""``features_and_head``: the last spatial feature map and the linear classifier over its average.

CAM_c = sum_k w_ck F_k (Zhou et al. 2016) holds for a classifier whose logits are
``head(mean_hw features(x))``. One adapter per family gives those two halves:

* backmix's own ``Classifier32`` and ``WideResNet``: ``.features``, ``.fc``;
* torchvision ResNet (ResNeXt, wide_resnet), RegNet, EfficientNet (v1, v2), MobileNetV2, DenseNet;
* ConvNeXt (torchvision and timm), whose head is a LayerNorm over the pooled vector before
  the linear layer: folded into an equivalent linear head (formula in ``_fold_layer_norm``);
* timm models through ``forward_features`` and ``get_classifier()``, accepted when
  ``forward_head`` is exactly global average pooling (+ that LayerNorm) then that linear
  layer (checked on a random feature map, so no family list goes stale).

* timm's vision transformers (ViT, DeiT, with register tokens): the final patch tokens (class,
  distillation and register tokens dropped) as a map on the patch grid, under the head's class
  weights (with ``fc_norm``, a LayerNorm over the pooled tokens, folded in as for ConvNeXt). With the
  class-token pool (ViT's and DeiT's default) no logit is exactly a sum over positions: the map is
  the head applied to each patch token, the CAM usual for token models;
* timm's Swin: the last stage's map (channels-last in timm) under the linear classifier of its
  average-pooling head.

Anything else (torchvision's ViT, an MLP head as in VGG or MobileNetV3, a norm or attention pool
inside a timm head) is refused with one line naming the model.
"""
from __future__ import annotations

from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models as tv

from backmix.osr_data.errors import BackMixError

from .nets import Classifier32, WideResNet
from .zoo import unwrap


def features_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(module giving the last feature map [B, C, h, w], the linear layer over its global average)."""
    model = unwrap(model)
    if isinstance(model, (Classifier32, WideResNet)):
        return model.features, model.fc
    if isinstance(model, tv.ResNet):
        return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                             model.layer1, model.layer2, model.layer3, model.layer4), model.fc
    if isinstance(model, tv.RegNet):
        return nn.Sequential(model.stem, model.trunk_output), model.fc
    if isinstance(model, (tv.EfficientNet, tv.MobileNetV2)):
        return model.features, _last_linear(model, model.classifier)     # Dropout, Linear
    if isinstance(model, tv.DenseNet):
        return nn.Sequential(model.features, nn.ReLU()), model.classifier  # forward: relu, pool, linear
    if isinstance(model, tv.ConvNeXt):
        return model.features, _convnext(model)
    if isinstance(model, tv.VisionTransformer):
        _refuse(model, "its class-token head reads one token that attention mixed from all patches, "
                       "so no logit is a sum over positions")
    token_model = _timm_token_model(model)
    if token_model is not None:
        return token_model
    if all(callable(getattr(model, m, None)) for m in ("forward_features", "forward_head", "get_classifier")):
        return _ForwardFeatures(model), _timm_head(model)
    _refuse(model, "its head is not global average pooling + one linear layer (supported: backmix cnn32 and "
                   "wrn, torchvision ResNet/RegNet/EfficientNet/MobileNetV2/DenseNet/ConvNeXt, timm models "
                   "with a pooling head)")


def _name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return f"timm:{cfg['architecture']}"
    return type(model).__name__


def _refuse(model: nn.Module, why: str) -> NoReturn:
    raise BackMixError(f"cannot take CAMs of {_name(model)}: {why}")


def _last_linear(model: nn.Module, classifier: nn.Sequential) -> nn.Linear:
    if not all(isinstance(m, (nn.Dropout, nn.Linear)) for m in classifier) or not isinstance(classifier[-1], nn.Linear):
        _refuse(model, "its classifier is not dropout + one linear layer")
    return classifier[-1]


def _convnext(model: nn.Module) -> nn.Linear:
    norm, linear = model.classifier[0], model.classifier[-1]                 # LayerNorm2d, Flatten, Linear
    if not isinstance(norm, nn.LayerNorm) or not isinstance(linear, nn.Linear):
        _refuse(model, "its classifier is not LayerNorm2d + one linear layer")
    return _fold_layer_norm(norm, linear)


def _fold_layer_norm(norm: nn.LayerNorm, linear: nn.Linear) -> nn.Linear:
    """The linear head equivalent, for CAMs, to a LayerNorm over the pooled map followed by ``linear``
    (ConvNeXt's head, in torchvision and timm).

    With p = mean_hw F (the pooled features), mu and sigma = sqrt(var + eps) the mean and
    standard deviation of p over its C channels (one scalar each per image), gamma, beta the
    norm's affine parameters and W, b the linear layer:

        logit_c = sum_k W_ck (gamma_k (p_k - mu) / sigma + beta_k) + b_c
                = mean_hw [ sum_k (W_ck gamma_k) F_k(hw) ] / sigma + const_c

    with const_c = (W beta + b)_c - (mu / sigma) sum_k W_ck gamma_k, the same at every position.
    So CAM_c = sum_k (W_ck gamma_k) F_k, up to the positive per-image scale 1 / sigma and a
    per-image shift, both of which the per-image min-max scaling of the CAM removes: the CAM
    of the folded head (weights W * gamma, bias W beta + b) is exact.
    """
    gamma = norm.weight if norm.weight is not None else torch.ones_like(linear.weight[0])
    beta = norm.bias if norm.bias is not None else torch.zeros_like(linear.weight[0])
    with torch.no_grad():
        folded = nn.Linear(linear.in_features, linear.out_features).to(linear.weight)
        folded.weight.copy_(linear.weight * gamma)
        folded.bias.copy_(linear.weight @ beta + (linear.bias if linear.bias is not None else 0))
    return folded.requires_grad_(False)


def _timm_head(model: nn.Module) -> nn.Linear:
    """``get_classifier()`` when ``forward_head`` is average pooling + it, or its LayerNorm fold when a
    LayerNorm sits between (timm ConvNeXt); both checked on a random feature map."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        _refuse(model, f"its classifier is a {type(head).__name__}, not one linear layer")
    probe = torch.randn(2, head.in_features, 3, 2, generator=torch.Generator().manual_seed(0))
    probe = probe.to(head.weight)
    pooled = probe.mean((2, 3))
    norm = getattr(getattr(model, "head", None), "norm", None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            got = model.forward_head(probe)
            if isinstance(norm, nn.LayerNorm) and _same(got, head(F.layer_norm(pooled, norm.normalized_shape,
                                                                                norm.weight, norm.bias, norm.eps))):
                return _fold_layer_norm(norm, head)
            if _same(got, head(pooled)):
                return head
    except Exception:   # a token or channels-last head fails on a [B, C, h, w] map in many ways
        pass
    finally:
        model.train(was_training)
    _refuse(model, "its forward_head is not global average pooling (+ LayerNorm) + the linear classifier on "
                   "a [B, C, h, w] map (a token pool or an MLP sits in between)")


def _same(got: Tensor, want: Tensor) -> bool:
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)


class _ForwardFeatures(nn.Module):
    """A timm model's ``forward_features`` as a module (it must give [B, C, h, w])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        f = self.model.forward_features(x)
        if f.ndim != 4:
            _refuse(self.model, f"forward_features gives a {f.ndim}-d tensor, not a [B, C, h, w] map")
        return f


def _timm_token_model(model: nn.Module) -> "tuple[nn.Module, nn.Linear] | None":
    """(body, head) of a timm ViT/DeiT or Swin; None for any other model."""
    try:
        from timm.models.swin_transformer import SwinTransformer
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    if isinstance(model, VisionTransformer):
        if getattr(model, "attn_pool", None) is not None:
            _refuse(model, "its head pools the tokens by attention (global_pool='map'), not by one linear layer "
                           "on each of them")
        head = model.head
        if not isinstance(head, nn.Linear):
            _refuse(model, f"its classifier is a {type(head).__name__}, not one linear layer")
        norm = model.fc_norm
        return _PatchTokens(model), _fold_layer_norm(norm, head) if isinstance(norm, nn.LayerNorm) else head
    if isinstance(model, SwinTransformer):
        head = model.get_classifier()
        if getattr(getattr(model.head, "global_pool", None), "pool_type", None) != "avg" or not isinstance(
                head, nn.Linear):
            _refuse(model, "its head is not average pooling + one linear layer")
        return _ChannelsLastMap(model), head
    return None


class _PatchTokens(nn.Module):
    """A timm ViT's final patch tokens as a map [B, D, h, w] on the patch grid (prefix tokens dropped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        x = at_input_size(self.model, x)
        tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens:]
        ph, pw = self.model.patch_embed.patch_size
        h, w = x.shape[-2] // ph, x.shape[-1] // pw
        return tokens.transpose(1, 2).reshape(x.shape[0], tokens.shape[-1], h, w)


class _ChannelsLastMap(nn.Module):
    """A timm Swin's last feature map, [B, H, W, C] there, as [B, C, H, W]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(at_input_size(self.model, x)).permute(0, 3, 1, 2)


def at_input_size(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` resized to the input size a fixed-size model was built for (a CAM is taken of the whole
    canvas, larger than the crops the model trains on); the map still covers the whole canvas."""
    size = tuple(getattr(model.patch_embed, "img_size", None) or x.shape[-2:])
    if tuple(x.shape[-2:]) == size or not getattr(model.patch_embed, "strict_img_size", True):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
