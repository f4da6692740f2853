"""SyncNet: embeds short video windows and the matching audio windows so that in-sync pairs are close.

One model serves three places: the data job's sync filter and AV-offset correction, the SyncNet
reward of DMD distillation, and the Sync-C / Sync-D metrics. Two architectures share one interface
(`video_windows`, `audio_windows`, `embed_video`, `embed_audio`, `window`):

- `SyncNetV2`: the public syncnet_v2.model (5-frame 224-px face crops in BGR 0..255, 13 MFCC x 20
  frames), with its original parameter names so that file loads as it is.
- `StableSyncNet`: trainable on our own shards at our crop size (LatentSync-style): N frames of the
  lower half of the aligned face stacked on channels, a log-mel window, cosine similarity.

Window i covers video frames i .. i+N-1 and audio features 4i .. 4i+4N-1 (100 Hz features, 25 fps).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lipforcing import storage
from lipforcing.metrics.sync import SyncResult, av_sync
from lipforcing.models.sync_audio import log_mel, syncnet_mfcc

AUDIO_PER_FRAME = 4  # 100 Hz audio features per 25 fps video frame


@dataclass
class SyncNetConfig:
    weights: str = ""  # checkpoint path or URL; empty means none (the data job can train one)
    frames: int = 5  # video frames per window (syncnet_v2 always uses 5)
    size: int = 64  # aligned face resized to size x size; the lower half is the input
    mel_bins: int = 40
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    embed_dim: int = 256


class StableSyncNet(nn.Module):
    """Two small conv encoders; pooled to one embedding each, compared by cosine similarity."""

    def __init__(self, config: SyncNetConfig):
        super().__init__()
        self.config = config
        self.window = config.frames
        self.video_encoder = _conv_encoder(3 * config.frames, config.channels, config.embed_dim)
        self.audio_encoder = _conv_encoder(1, config.channels, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.full((1,), 5.0))  # 1-d: DeepSpeed cannot broadcast 0-d params

    def video_windows(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames [T, H, W, 3] -> [T-N+1, 3N, size/2, size] in [-1, 1]."""
        size = self.config.size
        video = frames.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        video = F.interpolate(video, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        lower = video[:, :, size // 2 :, :]
        windows = lower.unfold(0, self.window, 1)  # [W, 3, h, w, N]
        return windows.permute(0, 4, 1, 2, 3).flatten(1, 2).contiguous()

    def audio_windows(self, audio: np.ndarray) -> torch.Tensor:
        """16 kHz mono audio -> [windows, 1, mel_bins, 4N]."""
        mel = log_mel(audio, self.config.mel_bins)
        mel = (mel - mel.mean()) / (mel.std() + 1e-5)
        return _feature_windows(mel, self.window)

    def embed_video(self, windows: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.video_encoder(windows), dim=-1)

    def embed_audio(self, windows: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.audio_encoder(windows), dim=-1)

    def sync_logits(self, video_windows: torch.Tensor, audio_windows: torch.Tensor) -> torch.Tensor:
        """Logit that each (video, audio) pair is in sync: scaled cosine similarity."""
        cosine = (self.embed_video(video_windows) * self.embed_audio(audio_windows)).sum(-1)
        return self.logit_scale * cosine

    def forward(self, video_windows: torch.Tensor, audio_windows: torch.Tensor) -> torch.Tensor:
        return self.sync_logits(video_windows, audio_windows)


def _conv_encoder(in_channels: int, channels: list[int], embed_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    previous = in_channels
    for width in channels:
        layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        previous = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, embed_dim)]
    return nn.Sequential(*layers)


class SyncNetV2(nn.Module):
    """The syncnet_python architecture; parameter names match syncnet_v2.model."""

    window = 5

    def __init__(self, embed_dim: int = 1024):
        super().__init__()

        def conv2(cin, cout, kernel=3, padding=1):
            return [nn.Conv2d(cin, cout, kernel, stride=1, padding=padding), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        def conv3(cin, cout, kernel, stride=(1, 1, 1), padding=(0, 0, 0)):
            return [nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]

        self.netcnnaud = nn.Sequential(
            *conv2(1, 64), nn.MaxPool2d(1, 1),
            *conv2(64, 192), nn.MaxPool2d(3, stride=(1, 2)),
            *conv2(192, 384), *conv2(384, 256), *conv2(256, 256), nn.MaxPool2d(3, stride=2),
            *conv2(256, 512, kernel=(5, 4), padding=0),
        )  # fmt: skip
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim))
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embed_dim))
        self.netcnnlip = nn.Sequential(
            *conv3(3, 96, (5, 7, 7), stride=(1, 2, 2)), nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2)),
            *conv3(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            *conv3(256, 256, (1, 3, 3), padding=(0, 1, 1)), *conv3(256, 256, (1, 3, 3), padding=(0, 1, 1)),
            *conv3(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2)),
            *conv3(256, 512, (1, 6, 6)),
        )  # fmt: skip

    def video_windows(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 RGB face crops [T, H, W, 3] -> [T-4, 3, 5, 224, 224], BGR 0..255 as the weights expect."""
        video = frames.flip(-1).permute(0, 3, 1, 2).float()
        video = F.interpolate(video, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        return video.unfold(0, self.window, 1).permute(0, 1, 4, 2, 3).contiguous()

    def audio_windows(self, audio: np.ndarray) -> torch.Tensor:
        return _feature_windows(torch.from_numpy(syncnet_mfcc(audio)), self.window)

    def embed_video(self, windows: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(windows).flatten(1))

    def embed_audio(self, windows: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(windows).flatten(1))


def _feature_windows(features: torch.Tensor, frames: int) -> torch.Tensor:
    """[bins, F] features at 100 Hz -> [windows, 1, bins, 4*frames], window i starting at 4i."""
    width = AUDIO_PER_FRAME * frames
    windows = features.unfold(1, width, AUDIO_PER_FRAME)  # [bins, W, width]
    return windows.permute(1, 0, 2).unsqueeze(1).contiguous()


SyncModel = StableSyncNet | SyncNetV2


def load_syncnet(config: SyncNetConfig, key: str = "syncnet.weights") -> SyncModel:
    """Load the SyncNet at `config.weights`: our checkpoint (which carries its own architecture
    config, so a reader needs only the path) or else the public syncnet_v2.model layout.
    `key` names the config key for errors.
    """
    if not config.weights:
        raise FileNotFoundError(f"no SyncNet weights: set config key '{key}' to a syncnet_v2.model or a trained checkpoint")
    if not storage.exists(config.weights):
        raise FileNotFoundError(f"SyncNet weights not found at {config.weights!r} (config key '{key}')")
    fs, path = storage.filesystem(config.weights)
    with fs.open(path, "rb") as handle:
        state = torch.load(handle, map_location="cpu", weights_only=True)
    if "config" in state:
        known = {f.name for f in fields(SyncNetConfig)}  # older checkpoints also saved a `variant`
        saved = {**{k: v for k, v in state["config"].items() if k in known}, "weights": config.weights}
        model = StableSyncNet(SyncNetConfig(**saved))
        state = state["state_dict"]
    else:
        model = SyncNetV2()
    if isinstance(model, SyncNetV2):
        # Checkpoints saved before BatchNorm counted its batches lack num_batches_tracked.
        for name, buffer in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                state.setdefault(name, torch.zeros_like(buffer))
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def clip_embeddings(
    model: SyncModel, frames: torch.Tensor, audio: np.ndarray, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window embeddings of a clip's video and audio, trimmed to the same length."""
    device = next(model.parameters()).device
    video_windows, audio_windows = model.video_windows(frames), model.audio_windows(audio)
    count = min(len(video_windows), len(audio_windows))
    if count <= 0:
        raise ValueError(f"clip too short for a {model.window}-frame SyncNet window")
    video = torch.cat([model.embed_video(video_windows[i : i + batch].to(device)) for i in range(0, count, batch)])
    sound = torch.cat([model.embed_audio(audio_windows[i : i + batch].to(device)) for i in range(0, count, batch)])
    return video[:count].cpu(), sound[:count].cpu()


def score_clip(model: SyncModel, frames: torch.Tensor, audio: np.ndarray, vshift: int = 15) -> SyncResult:
    """AV offset, Sync-C and Sync-D of aligned face frames [T, H, W, 3] uint8 against 16 kHz audio."""
    was_training = model.training
    model.eval()
    try:
        return av_sync(*clip_embeddings(model, frames, audio), vshift=vshift)
    finally:
        model.train(was_training)


def save_syncnet(model: StableSyncNet, url: str) -> None:
    """Our checkpoint format: the state dict plus the config that built it."""
    import dataclasses
    import io

    buffer = io.BytesIO()
    torch.save({"config": dataclasses.asdict(model.config), "state_dict": model.state_dict()}, buffer)
    storage.write_bytes(url, buffer.getvalue())
