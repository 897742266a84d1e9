"""backmix.models: any torchvision/timm model or WRN by name, checkpoints that rebuild it, CAMs per head."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv

from backmix.cam_cache import compute_cams
from backmix.cli import main as cli_main
from backmix.models import build_model, check_arch, features_and_head, load_model, save_checkpoint
from backmix.osr_data import BackMixError, ImageIndex
from backmix.osr_data.decode import decode_canvas
from backmix.trainers.config import TrainConfig

from helpers import random_image_root

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def index(digits_root) -> ImageIndex:
    return ImageIndex.load(digits_root / "train")


@pytest.fixture(scope="module")
def three_class_root(tmp_path_factory) -> Path:
    """root/train (6 a class) and root/test (3 a class): 32x32 random RGB images of classes a, b, c."""
    return random_image_root(tmp_path_factory.mktemp("three"), ("a", "b", "c"), 6, 3)


# --- CAMs of each family --------------------------------------------------------------------------

def pool_input(model: nn.Module, pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The map the model's own global pooling receives when it classifies x (read by a hook)."""
    seen = []
    handle = pool.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("arch,canvas,pool", [("resnet18", 64, "avgpool"), ("timm:resnet18", 64, "global_pool"),
                                              ("wrn40_4", 32, "pool")])
def test_cams_equal_the_hand_computation(index, arch, canvas, pool):
    """einsum of the last feature map with the label's fc weights, min-max per image, bilinear to the canvas,
    average-pooled to g x g; the feature map is the one the model's own pooling layer sees."""
    torch.manual_seed(0)
    model = build_model(arch, 10).eval()
    rows = np.array([0, 5, 400])
    labels = index.labels[rows]
    got = compute_cams(model, index, rows, labels, canvas=canvas, grid=4, mean=MEAN, std=STD, num_workers=0,
                       progress=False)
    x = torch.stack([decode_canvas(index.abspath(int(r)), canvas) for r in rows]).float()
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1) * 255) / (torch.tensor(STD).view(1, 3, 1, 1) * 255)
    feats = pool_input(model, getattr(model, pool), x).double()
    assert feats.shape[2] >= 2                      # a real map, not a 1 x 1
    cam = torch.einsum("bchw,bc->bhw", feats, model.fc.weight.detach().double()[torch.as_tensor(labels)])
    lo, hi = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    up = F.interpolate(((cam - lo) / (hi - lo))[:, None], size=(canvas, canvas), mode="bilinear",
                       align_corners=False)
    expected = F.adaptive_avg_pool2d(up, 4)[:, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize("arch", ["cnn32", "wrn16_2", "resnet18", "regnet_y_400mf", "efficientnet_b0",
                                  "mobilenet_v2", "densenet121", "timm:resnet18", "timm:efficientnet_b0"])
def test_each_supported_family_is_its_linear_head_over_the_pooled_map(arch):
    torch.manual_seed(0)
    model = build_model(arch, 5).eval()
    features, head = features_and_head(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = features(x)
        assert f.ndim == 4 and f.shape[1] == head.in_features and head.out_features == 5
        torch.testing.assert_close(head(f.mean((2, 3))), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,norm_and_linear", [("convnext_tiny", lambda m: (m.classifier[0], m.classifier[2])),
                                                   ("timm:convnext_atto", lambda m: (m.head.norm, m.head.fc))])
def test_convnext_cam_is_the_folded_layernorm_head(arch, norm_and_linear):
    """logit_c = mean_hw[sum_k W_ck gamma_k F_k] / sigma + const_c (see models/cam.py): the folded head's map
    is the model's own per-position logit contribution up to a positive scale and a shift per image."""
    torch.manual_seed(0)
    model = build_model(arch, 4).eval()
    norm, linear = norm_and_linear(model)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()                       # a non-trivial affine norm
    features, head = features_and_head(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = features(x).double()
        logits = model(x).double()
    p = f.mean((2, 3))                                                       # [B, C]
    mu, sigma = p.mean(1, keepdim=True), (p.var(1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    w, gamma, beta = linear.weight.double(), norm.weight.double(), norm.bias.double()
    # the model's logit, position by position: contribution(hw) = sum_k W_ck gamma_k (F_k(hw) - mu) / sigma
    contribution = torch.einsum("bkhw,ck->bchw", (f - mu[..., None, None]) / sigma[..., None, None], w * gamma)
    torch.testing.assert_close(contribution.mean((2, 3)) + w @ beta + linear.bias.double(), logits,
                               atol=1e-4, rtol=1e-4)
    labels = torch.tensor([1, 3])
    from backmix.cam_cache import class_activation_maps
    h = f.shape[2]
    got = class_activation_maps(f.float(), head.weight, labels, grid=h, canvas=h)   # grid = map: no pooling
    own = contribution[torch.arange(2), labels]
    own = (own - own.amin((1, 2), keepdim=True)) / (own.amax((1, 2), keepdim=True) - own.amin((1, 2), keepdim=True))
    torch.testing.assert_close(got.double(), own, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make,why", [
    (lambda: tv.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=1, hidden_dim=8,
                                  mlp_dim=8, num_classes=3), "VisionTransformer: its class-token head"),
    (lambda: build_model("mobilenet_v3_small", 3), "MobileNetV3: its head is not global average pooling"),
    (lambda: build_model("timm:mobilenetv3_small_050", 3),
     "timm:mobilenetv3_small_050: its forward_head is not global average pooling"),
    (lambda: build_model("timm:vit_tiny_patch16_224", 3, global_pool="map", image_size=32),
     "timm:vit_tiny_patch16_224: its head pools the tokens by attention"),
])
def test_a_head_without_a_cam_is_refused_with_one_line(make, why):
    with pytest.raises(BackMixError, match=f"^cannot take CAMs of {why}") as e:
        features_and_head(make())
    assert "\n" not in str(e.value)


def test_cache_build_of_an_unsupported_checkpoint_is_one_error_line(tmp_path, three_class_root, capsys):
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("mobilenet_v3_small", 3), arch="mobilenet_v3_small",
                           num_classes=3)
    assert cli_main(["cache", "build", "--data", str(three_class_root / "train"), "--checkpoint", str(ckpt),
                     "--cache", str(tmp_path / "c"), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("backmix: error: cannot take CAMs of MobileNetV3")


# --- names and checkpoints ------------------------------------------------------------------------

@pytest.mark.parametrize("arch,message", [
    ("resnet7", "unknown model 'resnet7'"), ("wrn41_4", "depth 6n\\+4"), ("wrn40_0", "width >= 1"),
    ("timm:no_such_net", "timm has no model 'no_such_net'"), ("fasterrcnn_resnet50_fpn", "unknown model")])
def test_unknown_arch_is_refused(arch, message):
    with pytest.raises(BackMixError, match=message):
        check_arch(arch)
    with pytest.raises(BackMixError, match=message):
        TrainConfig(arch=arch)


def test_wrn40_4_is_the_cssr_backbone():
    """WRN-40-4: 3 groups of 6 pre-activation blocks of 64, 128, 256 channels, an 8 x 8 map at 32 px."""
    model = build_model("wrn40_4", 6)

    def block(cin, cout):   # bn1, conv1, bn2, conv2, 1x1 shortcut where the shape changes
        return 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout + (cin * cout if cin != cout else 0)
    expected = 3 * 16 * 9 + sum(block(cin, cout) + 5 * block(cout, cout)
                                for cin, cout in ((16, 64), (64, 128), (128, 256))) + 2 * 256 + 257 * 6
    assert sum(p.numel() for p in model.parameters()) == expected          # 8.95M, as published
    features, head = features_and_head(model)
    assert features(torch.randn(1, 3, 32, 32)).shape == (1, 256, 8, 8) and head.out_features == 6


@pytest.mark.parametrize("arch", ["vit_b_16", "timm:vit_tiny_patch16_224"])
def test_fixed_size_models_are_built_for_the_crop(arch):
    assert TrainConfig(arch=arch, canvas=56, crop=48).model_kwargs == {"image_size": 48}
    model = build_model(arch, 3, image_size=48).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_a_size_the_model_cannot_take_is_one_error_line():
    with pytest.raises(BackMixError, match="^cannot build maxvit_t for 32 px inputs: Input size .* not divisible"):
        build_model("maxvit_t", 3, image_size=32)


def test_checkpoint_rebuilds_its_arch(tmp_path):
    torch.manual_seed(0)
    model = build_model("timm:resnet18", 3)
    path = save_checkpoint(tmp_path / "m.pt", model, arch="timm:resnet18", num_classes=3)
    again, ckpt = load_model(path)
    assert ckpt["arch"] == "timm:resnet18" and type(again) is type(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model.eval()(x))
    with pytest.raises(BackMixError, match="holds a timm:resnet18 model, not resnet18"):
        load_model(path, arch="resnet18")


def test_train_cli_refuses_an_unknown_arch_in_one_line(three_class_root, tmp_path, capsys):
    assert cli_main(["train", "--data", str(three_class_root), "--out", str(tmp_path / "r"), "--arch", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("backmix: error: unknown model 'nope'")


def test_train_with_backmix_refuses_a_model_without_cams_before_training(three_class_root, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli_main(["train", "--data", str(three_class_root), "--out", str(out), "--arch", "mobilenet_v3_small",
                     "--known", "a,b", "--canvas", "40", "--crop", "32", "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot take CAMs of MobileNetV3" in err[0]
    assert not (out / "last.pt").exists() and not (out / "metrics.jsonl").exists()   # refused before an epoch


# --- training any arch ----------------------------------------------------------------------------

def train_one_epoch(root: Path, out: Path, arch: str, canvas: int, crop: int, *options: str) -> dict:
    assert cli_main(["train", "--data", str(root), "--out", str(out), "--arch", arch, "--canvas", str(canvas),
                     "--crop", str(crop), "--epochs", "1", "--known", "a,b", "--batch-size", "6", "--workers", "0",
                     "--device", "cpu", "--no-progress", "--val-fraction", "0", *options]) == 0   # 12 images: all trained
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["arch"] == arch and ckpt["epoch"] == 1 and np.isfinite(ckpt["metrics"][-1]["loss"])
    return ckpt


@pytest.mark.parametrize("arch", ["wrn40_4", "regnet_y_400mf"])
def test_wrn_and_regnet_train_an_epoch(three_class_root, tmp_path, arch):
    train_one_epoch(three_class_root, tmp_path / "run", arch, 40, 32, "--no-backmix")   # BackMix: the timm test


def test_timm_model_trains_evaluates_and_builds_the_cache(three_class_root, tmp_path, capsys):
    """`backmix eval` and `backmix cache build` (CAMs of that model) rebuild it from the checkpoint."""
    out = tmp_path / "run"
    train_one_epoch(three_class_root, out, "timm:resnet18", 64, 56)
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(out / "last.pt"), "--data", str(three_class_root),
                     "--workers", "0", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_known"] == 6
    assert cli_main(["cache", "build", "--data", str(three_class_root / "train"), "--checkpoint",
                     str(out / "last.pt"), "--cache", str(tmp_path / "c"), "--workers", "0", "--device", "cpu",
                     "--no-progress"]) == 0
    assert "generation 1 published" in capsys.readouterr().out


@pytest.mark.parametrize("arch, kwargs", [
    ("vit_small_patch16_224", dict(patch_size=8, depth=1, num_heads=2, embed_dim=16)),                # class token
    ("vit_small_patch16_224", dict(patch_size=8, depth=1, num_heads=2, embed_dim=16, reg_tokens=2,
                                   global_pool="avg", fc_norm=True)),                               # registers, avg
    ("deit_tiny_patch16_224", dict(patch_size=8, depth=1)),
    ("swin_tiny_patch4_window7_224", dict(depths=(1, 1), num_heads=(1, 2), embed_dim=8, window_size=4)),
], ids=["vit", "vit-registers-avg", "deit", "swin"])
def test_transformer_cams_are_the_head_on_each_patch_token(arch, kwargs):
    """By hand: a ViT/DeiT's CAM is its head's class weights on the final patch tokens (class and register
    tokens dropped; a LayerNorm fc_norm folded in), on the patch grid; a Swin's is its linear classifier on
    the last stage's map."""
    from backmix.cam_cache import class_activation_maps
    torch.manual_seed(0)
    model = build_model(arch, 5, image_size=32, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    body, head = features_and_head(model)
    with torch.no_grad():
        tokens = model.forward_features(x)
        if arch.startswith("swin"):
            grid = tokens.permute(0, 3, 1, 2)                         # [B, H, W, C] in timm
            weight = model.get_classifier().weight
        else:
            patches = tokens[:, model.num_prefix_tokens:]             # class (and register) tokens dropped
            side = int(patches.shape[1] ** 0.5)
            grid = patches.transpose(1, 2).reshape(2, -1, side, side)
            norm = model.fc_norm
            gamma = norm.weight if isinstance(norm, nn.LayerNorm) else torch.ones(grid.shape[1])
            weight = model.head.weight * gamma
        torch.testing.assert_close(body(x), grid)
        labels = torch.tensor([1, 4])
        h = grid.shape[2]
        got = class_activation_maps(body(x), head.weight, labels, grid=h, canvas=h)
        own = torch.einsum("bchw,bc->bhw", grid, weight[labels])
        lo, hi = own.amin((1, 2), keepdim=True), own.amax((1, 2), keepdim=True)
        want = torch.where(hi - lo > 1e-12, (own - lo) / (hi - lo).clamp_min(1e-12), torch.full_like(own, 0.5))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["vit_small_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_transformers_train_with_backmix_and_rebuild_the_cache_in_the_loop(three_class_root, tmp_path, arch):
    out = tmp_path / "run"
    assert cli_main(["-q", "train", "--data", str(three_class_root), "--out", str(out), "--arch", arch,
                     "--epochs", "2", "--regen-every", "1", "--known", "a,b", "--batch-size", "6", "--workers", "0",
                     "--val-fraction", "0", "--device", "cpu", "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["regenerated"] == 1 and records[1]["cache_generation"] == 1
    assert all(np.isfinite(r["loss"]) for r in records) and "auroc_msp" in records[-1]["eval"]


def test_a_wrapped_model_is_unwrapped_by_one_function_everywhere():
    from backmix.models import unwrap
    net = build_model("cnn32", 3, width=0.25)

    class Wrapper(nn.Module):   # what DistributedDataParallel and an EMA look like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap(net) is net and unwrap(Wrapper(net)) is net
    assert features_and_head(Wrapper(net))[1] is net.fc
