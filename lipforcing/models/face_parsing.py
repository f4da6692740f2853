"""Face parsing: which pixels of a face crop are face surface, and which are something in front of it.

BiSeNet (Yu et al. 2018) as the public face-parsing checkpoint trained on CelebAMask-HQ builds it
(`79999_iter.pth`, 19 classes): a ResNet-18 context path with attention refinement at 1/16 and 1/32,
the 1/8 backbone features in place of a spatial path, a feature-fusion module and a classifier head,
upsampled to the input. The module names below are that checkpoint's key names, so it loads by path as
released (`load_face_parser`). Paste-back keeps the original frame wherever the parser sees no face
surface: a hand, a microphone, hair or glasses over the mouth stay in front of the generated mouth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipforcing import storage

# CelebAMask-HQ's classes in the checkpoint's order.
CLASSES = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
           "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")  # fmt: skip
# What the generated mouth may replace: skin, nose, mouth and lips (glasses, hair, hands and cloth stay).
SURFACE = tuple(CLASSES.index(name) for name in ("skin", "nose", "mouth", "u_lip", "l_lip"))
INPUT_SIZE = 512
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as it was trained


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18(nn.Module):
    """The backbone; returns the 1/8, 1/16 and 1/32 features (128, 256, 512 channels)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = ((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2))
        for index, (cin, cout, stride) in enumerate(widths, start=1):
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        eighth = self.layer2(x)
        sixteenth = self.layer3(eighth)
        return eighth, sixteenth, self.layer4(sixteenth)


class AttentionRefinement(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        attention = torch.sigmoid(self.bn_atten(self.conv_atten(features.mean((2, 3), keepdim=True))))
        return features * attention


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eighth, sixteenth, thirtysecond = self.resnet(x)
        context = self.conv_avg(thirtysecond.mean((2, 3), keepdim=True))
        up32 = F.interpolate(self.arm32(thirtysecond) + context, size=sixteenth.shape[2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(sixteenth) + up32, size=eighth.shape[2:], mode="nearest")
        return eighth, self.conv_head16(up16)


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, 1, 1, 0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        features = self.convblk(torch.cat([spatial, context], dim=1))
        attention = torch.sigmoid(self.conv2(F.relu(self.conv1(features.mean((2, 3), keepdim=True)))))
        return features + features * attention


class Head(nn.Module):
    def __init__(self, cin: int, mid: int, classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    def __init__(self, classes: int = len(CLASSES)):
        super().__init__()
        self.cp = ContextPath()  # no spatial path: the 1/8 backbone features stand in for it, as released
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = Head(256, 256, classes)
        self.conv_out16 = Head(128, 64, classes)  # training-time auxiliary heads, kept for the key names
        self.conv_out32 = Head(128, 64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [B, classes, H, W] of normalised images [B, 3, H, W]."""
        eighth, context = self.cp(x)
        logits = self.conv_out(self.ffm(eighth, context))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)

    @torch.no_grad()
    def surface(self, crops: torch.Tensor) -> torch.Tensor:
        """[B, H, W] float on the CPU: 1 where crops ([B, 3, H, W] in [0, 1], on any device) show face
        surface (`SURFACE`), else 0. Only that surface is replaced: generated lips that open past the
        source's chin line are cut there."""
        size = crops.shape[2:]
        x = crops.to(next(self.parameters()).device)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False) if size != (INPUT_SIZE, INPUT_SIZE) else x
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (MEAN, STD))
        classes = self((x - mean) / std).argmax(1, keepdim=True).float()
        classes = F.interpolate(classes, size=size, mode="nearest")[:, 0]
        return torch.isin(classes, torch.tensor(SURFACE, dtype=classes.dtype, device=classes.device)).float().cpu()


def load_face_parser(path: str, key: str = "parsing_weights") -> BiSeNet:
    """The released checkpoint (a state dict under its original key names) at a path or URL."""
    if not storage.exists(path):
        raise FileNotFoundError(f"no face-parsing weights at {path!r} (config key '{key}')")
    fs, location = storage.filesystem(path)
    with fs.open(location, "rb") as handle:
        state = torch.load(handle, map_location="cpu", weights_only=True)
    model = BiSeNet()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # older checkpoints lack the counters
    if missing or unexpected:
        raise ValueError(f"{path} is not a BiSeNet face-parsing checkpoint (config key '{key}'): "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")  # fmt: skip
    return model.eval()
