"""SyncNet models: public-checkpoint layout, audio features, window bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from python_speech_features import mfcc as reference_mfcc

from lipforcing.models.sync_audio import syncnet_mfcc
from lipforcing.models.syncnet import (
    StableSyncNet,
    SyncNetConfig,
    SyncNetV2,
    clip_embeddings,
    load_syncnet,
    save_syncnet,
)


def test_mfcc_matches_syncnet_python_on_int16_samples():
    """syncnet_python runs python_speech_features on the wav's int16 values; our float audio in
    [-1, 1] must give the same MFCCs (unscaled, c0 would come out ln(32768^2) = 20.79 lower)."""
    pcm = (np.random.default_rng(0).standard_normal(16000) * 3000).clip(-32768, 32767).astype(np.int16)
    reference = reference_mfcc(pcm, 16000).T
    for audio in (pcm.astype(np.float32) / 32768, pcm):
        ours = syncnet_mfcc(audio)
        assert ours.shape == reference.shape == (13, 99)
        assert np.abs(ours - reference).max() < 1e-4
    unscaled = reference_mfcc(pcm.astype(np.float64) / 32768, 16000).T
    assert np.allclose(reference[0] - unscaled[0], 2 * np.log(32768), atol=1e-6)  # the offset the fix removes


def test_syncnet_v2_layout_round_trip(tmp_path):
    """A checkpoint in syncnet_v2.model's layout (old BatchNorm: no num_batches_tracked) loads strictly."""
    torch.manual_seed(0)
    source = SyncNetV2().eval()
    for module in source.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.9, 1.1)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "netcnnaud.0.weight" in state and "netcnnlip.18.weight" in state and "netfclip.3.weight" in state
    path = tmp_path / "syncnet_v2.model"
    torch.save(state, path)

    loaded = load_syncnet(SyncNetConfig(weights=str(path)))  # recognised by its layout, as the jobs load it
    assert isinstance(loaded, SyncNetV2)
    frames = torch.randint(0, 255, (9, 64, 64, 3), dtype=torch.uint8)
    audio = np.random.default_rng(1).standard_normal(16000 * 9 // 25).astype(np.float32)
    for ours, theirs in zip(clip_embeddings(loaded, frames, audio), clip_embeddings(source, frames, audio)):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_syncnet_v2_rejects_foreign_keys(tmp_path):
    state = SyncNetV2().state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.model")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_syncnet(SyncNetConfig(weights=str(tmp_path / "bad.model")))


def test_our_checkpoint_round_trip(tmp_path):
    config = SyncNetConfig(frames=5, size=32, channels=[8, 16], embed_dim=32)
    model = StableSyncNet(config).eval()
    save_syncnet(model, str(tmp_path / "syncnet.pt"))
    loaded = load_syncnet(SyncNetConfig(weights=str(tmp_path / "syncnet.pt")))  # architecture from the file
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])


def test_checkpoint_from_an_older_config_still_loads(tmp_path):
    """Checkpoints saved while SyncNetConfig had a `variant` field keep loading."""
    model = StableSyncNet(SyncNetConfig(size=32, channels=[8, 16], embed_dim=32)).eval()
    path = tmp_path / "old.pt"
    save_syncnet(model, str(path))
    state = torch.load(path, weights_only=True)
    state["config"]["variant"] = "stable"
    torch.save(state, path)
    loaded = load_syncnet(SyncNetConfig(weights=str(path)))
    assert all(torch.equal(t, loaded.state_dict()[n]) for n, t in model.state_dict().items())


def test_missing_weights_name_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.syncnet.weights"):
        load_syncnet(SyncNetConfig(), key="data.syncnet.weights")
    with pytest.raises(FileNotFoundError, match="not found.*'syncnet.weights'"):
        load_syncnet(SyncNetConfig(weights=str(tmp_path / "absent.pt")))


def test_windows_line_up_video_and_audio():
    model = StableSyncNet(SyncNetConfig(frames=5, size=32, channels=[8], embed_dim=16))
    frames = torch.zeros(25, 40, 40, 3, dtype=torch.uint8)
    audio = np.zeros(16000, dtype=np.float32)  # exactly 25 frames of audio
    video_windows, audio_windows = model.video_windows(frames), model.audio_windows(audio)
    assert video_windows.shape == (21, 15, 16, 32)  # lower half of a 32-px face, 5 frames on channels
    assert audio_windows.shape == (21, 1, 40, 20)  # 4 audio frames per video frame


def test_log_mel_puts_a_tone_in_its_mel_band():
    """Our SyncNet's features: 100 frames per second, and a 1 kHz tone peaks in the band whose
    centre (HTK mel scale, 40 bands up to 8 kHz) is nearest 1 kHz."""
    from lipforcing.models.sync_audio import log_mel

    seconds = np.arange(16000) / 16000
    mel = log_mel((0.5 * np.sin(2 * np.pi * 1000 * seconds)).astype(np.float32))
    assert mel.shape == (40, 100)
    to_mel, to_hz = (lambda hz: 2595 * np.log10(1 + hz / 700)), (lambda m: 700 * (10 ** (m / 2595) - 1))
    centres = to_hz(np.linspace(0, to_mel(8000), 42))[1:-1]
    assert int(mel[:, 50].argmax()) == int(np.abs(centres - 1000).argmin())
