"""HyperIQA (Su et al., CVPR 2020) for CPU scoring with the public KonIQ checkpoint.

Parameter names follow the public `koniq_pretrained.pkl` (a HyperNet state dict): the backbone is
a ResNet-50 under `res.` with torchvision's names (`conv1`, `bn1`, `layer1.0.downsample.0`, ...)
plus the local-distortion-aware heads `res.lda{1..4}_*`; the hyper network is `conv1.{0,2,4}`,
`fc{1..4}w_conv`, `fc{1..5}b_fc`, `fc5w_fc`. Because the backbone uses torchvision's names, an
ImageNet `resnet50` state dict from torchvision also loads into it by key (no torchvision needed).
The target network has no parameters of its own: the hyper network predicts its weights per image.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224  # the LDA pooling sizes assume 224-px crops


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * 4
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout (v1.5: stride on the 3x3), without the classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        for index, (width, blocks, stride) in enumerate(
            [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], 1
        ):
            layers = [Bottleneck(channels, width, stride)] + [
                Bottleneck(width * 4, width) for _ in range(blocks - 1)
            ]
            setattr(self, f"layer{index}", nn.Sequential(*layers))
            channels = width * 4

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class HyperIQABackbone(ResNet50):
    """ResNet-50 plus the four local-distortion-aware (LDA) heads that build the target input."""

    def __init__(self, lda_channels: int = 16, target_in_size: int = 224):
        super().__init__()
        for index, (channels, reduced) in enumerate([(256, 16), (512, 32), (1024, 64)], 1):
            setattr(
                self,
                f"lda{index}_pool",
                nn.Sequential(nn.Conv2d(channels, reduced, 1, bias=False), nn.AvgPool2d(7, 7)),
            )
            setattr(self, f"lda{index}_fc", nn.Linear(reduced * (64 >> (2 * (index - 1))), lda_channels))
        self.lda4_pool = nn.AvgPool2d(7, 7)
        self.lda4_fc = nn.Linear(2048, target_in_size - 3 * lda_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.layer1(self.stem(x))
        parts = [self.lda1_fc(self.lda1_pool(x).flatten(1))]
        x = self.layer2(x)
        parts.append(self.lda2_fc(self.lda2_pool(x).flatten(1)))
        x = self.layer3(x)
        parts.append(self.lda3_fc(self.lda3_pool(x).flatten(1)))
        x = self.layer4(x)
        parts.append(self.lda4_fc(self.lda4_pool(x).flatten(1)))
        return x, torch.cat(parts, 1)


class HyperIQA(nn.Module):
    """HyperNet(16, 112, 224, 112, 56, 28, 14, 7) of the public release, with its target network."""

    def __init__(
        self, lda_channels=16, hyper_in=112, target_in=224, fc_sizes=(112, 56, 28, 14), feature_size=7
    ):
        super().__init__()
        self.hyper_in, self.target_in, self.fc_sizes, self.feature_size = (
            hyper_in,
            target_in,
            fc_sizes,
            feature_size,
        )
        self.res = HyperIQABackbone(lda_channels, target_in)
        self.conv1 = nn.Sequential(
            nn.Conv2d(2048, 1024, 1), nn.ReLU(inplace=True), nn.Conv2d(1024, 512, 1), nn.ReLU(inplace=True),
            nn.Conv2d(512, hyper_in, 1), nn.ReLU(inplace=True),
        )  # fmt: skip
        sizes = (target_in, *fc_sizes)
        for index in range(1, 5):
            weights_per_cell = sizes[index - 1] * sizes[index] // feature_size**2
            setattr(self, f"fc{index}w_conv", nn.Conv2d(hyper_in, weights_per_cell, 3, padding=1))
            setattr(self, f"fc{index}b_fc", nn.Linear(hyper_in, sizes[index]))
        self.fc5w_fc = nn.Linear(hyper_in, fc_sizes[-1])
        self.fc5b_fc = nn.Linear(hyper_in, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Quality per image (KonIQ scale, about 0-100) for normalised 224x224 crops."""
        features, target_input = self.res(images)
        hyper = self.conv1(features)
        pooled = hyper.mean((2, 3))
        batch = images.shape[0]
        sizes = (self.target_in, *self.fc_sizes)
        hidden = target_input
        for index in range(1, 5):
            weight = getattr(self, f"fc{index}w_conv")(hyper).reshape(batch, sizes[index], sizes[index - 1])
            bias = getattr(self, f"fc{index}b_fc")(pooled)
            hidden = torch.sigmoid(torch.einsum("boi,bi->bo", weight, hidden) + bias)
        weight = self.fc5w_fc(pooled)
        return (weight * hidden).sum(1) + self.fc5b_fc(pooled)[:, 0]


def load_hyperiqa(path: str) -> HyperIQA:
    """The KonIQ checkpoint (`koniq_pretrained.pkl`: a state dict, or {'model': state dict})."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    model = HyperIQA()
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_torchvision_resnet50(backbone: ResNet50, state: dict[str, torch.Tensor]) -> list[str]:
    """Load a torchvision `resnet50` state dict by key; returns the checkpoint keys left unused (fc)."""
    own = backbone.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in matched and not k.startswith("lda")]
    if missing:
        raise KeyError(f"torchvision resnet50 state dict lacks {missing[:5]}")
    backbone.load_state_dict(matched, strict=False)
    return sorted(set(state) - set(matched))


def five_crops(image: np.ndarray, resize_to: int = 320) -> torch.Tensor:
    """Four corner crops and the centre crop (224 px) of an RGB image resized to `resize_to`,
    ImageNet-normalised: the deterministic stand-in for the release's 10 random test crops."""
    import cv2

    resized = (
        cv2.resize(image, (resize_to, resize_to), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    )
    resized = (resized - IMAGENET_MEAN) / IMAGENET_STD
    far, middle = resize_to - INPUT_SIZE, (resize_to - INPUT_SIZE) // 2
    corners = [(0, 0), (0, far), (far, 0), (far, far), (middle, middle)]
    crops = [resized[y : y + INPUT_SIZE, x : x + INPUT_SIZE] for y, x in corners]
    return torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32))
