"""The two networks of the OSR literature that neither torchvision nor timm provides.

Both end in ``features`` (the last spatial map), global average pooling and one
linear layer ``fc``: the form ``features_and_head`` reads CAMs from.
"""
from __future__ import annotations

import torch
from torch import nn


class Classifier32(nn.Module):
    """The 9-layer CNN of the OSR literature for 32 px images (Neal et al. 2018; ARPL).

    ``width`` scales the channels (64/128 at 1.0) so that small CPU runs stay quick.
    """

    def __init__(self, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        c1, c2 = max(8, int(64 * width)), max(16, int(128 * width))

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]

        self.features = nn.Sequential(
            nn.Dropout2d(0.2),
            *block(3, c1, 1), *block(c1, c1, 1), *block(c1, c2, 2), nn.Dropout2d(0.2),
            *block(c2, c2, 1), *block(c2, c2, 1), *block(c2, c2, 2), nn.Dropout2d(0.2),
            *block(c2, c2, 1), *block(c2, c2, 1), *block(c2, c2, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the input
    (through a 1x1 convolution of the activated input when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if cin != cout or stride != 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(x))
        y = self.conv2(torch.relu(self.bn2(self.conv1(a))))
        return y + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-depth-k of Zagoruyko & Komodakis (2016) for 32 px inputs, the backbone of CSSR
    (Huang et al. 2022) at WRN-40-4: a 3x3 stem of 16 channels, three groups of
    (depth - 4) / 6 blocks of 16k, 32k, 64k channels at strides 1, 2, 2, then BN-ReLU:
    an 8 x 8 map of 64k channels at 32 px."""

    def __init__(self, num_classes: int, depth: int = 40, widen: int = 4) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 (n >= 1), got {depth}")
        n = (depth - 4) // 6
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)]
        cin = 16
        for cout, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
            for i in range(n):
                layers.append(_WideBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))
