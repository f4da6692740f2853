"""The streamed condition (chunk by chunk, flat memory) against the whole-clip one it replaces, and the
windowed wav2vec2 features a long waveform is read through."""

from __future__ import annotations

import pytest
import torch

from lipforcing.data.encode import LatentEncoder
from lipforcing.data.windows import WindowConfig
from lipforcing.inference.conditions import ConditionStream, chunk_frame_counts
from lipforcing.models.audio import WindowedAudioFeatures, build_audio_encoder, pack_audio
from lipforcing.models.config import model_config

SIZE, SAMPLES_PER_FRAME = 32, 640


def test_chunks_are_nine_frames_then_twelve_and_the_last_takes_what_is_left():
    assert chunk_frame_counts(9, 3) == [9]
    assert chunk_frame_counts(41, 3) == [9, 12, 12, 8]  # 11 latent frames: 3 + 3 + 3 + 2
    assert chunk_frame_counts(5, 3) == [5]
    assert sum(chunk_frame_counts(4 * 374 + 1, 3)) == 4 * 374 + 1
    with pytest.raises(ValueError, match="40 video frames is not 1 \\+ 4k"):
        chunk_frame_counts(40, 3)


def test_a_later_chunks_audio_packs_without_the_repeated_first_frame():
    features = torch.arange(2 * 21 * 3, dtype=torch.float32).reshape(2, 21, 3)
    whole = pack_audio(features)
    parts = [pack_audio(features[:, :9]), pack_audio(features[:, 9:], first=False)]
    assert torch.equal(torch.cat(parts, dim=1), whole)
    with pytest.raises(ValueError, match="9 video frames is not 0 \\+ 4 \\* k"):
        pack_audio(features[:, :9], first=False)


@pytest.mark.parametrize("use_reference_sequence", [False, True])
def test_the_streamed_condition_equals_the_whole_clips(use_reference_sequence):
    cfg = model_config("tiny", use_reference_sequence=use_reference_sequence)
    encoder = LatentEncoder(cfg, WindowConfig(size=SIZE))
    frames = 33
    generator = torch.Generator().manual_seed(1)
    video = torch.rand(1, frames, 3, SIZE, SIZE, generator=generator)
    audio = torch.randn(1, frames * SAMPLES_PER_FRAME, generator=generator)
    whole = encoder.condition({"video": video, "reference": video[:, :1], "audio": audio,
                               "reference_sequence": video if use_reference_sequence else None})  # fmt: skip
    stream = ConditionStream(encoder, video[:, :1], audio, frames)
    start = 0
    for index, count in enumerate(chunk_frame_counts(frames, cfg.chunk_frames)):
        chunk = stream.next(video[:, start : start + count])
        expected = whole.frames(3 * index, 3 * index + 3)
        for name in ("reference", "mask", "masked_video", "audio", "text", "reference_sequence"):
            got, want = getattr(chunk, name), getattr(expected, name)
            if want is None:
                assert got is None
            else:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"chunk {index}: {name}")
        start += count


def test_windowed_audio_features_run_each_window_with_its_context_and_the_whole_clips_statistics():
    """Planted answer: each window's rows are what the encoder gives for that window's audio with its
    context (the whole waveform's mean and variance), whatever the sizes the reader asks for."""
    encoder = build_audio_encoder(model_config("tiny")).eval()
    frames, window, context = 60, 20, 5
    waveform = torch.randn(1, frames * SAMPLES_PER_FRAME, generator=torch.Generator().manual_seed(2)) * 0.2 + 0.05
    stats = (waveform.mean(-1, keepdim=True), waveform.var(-1, keepdim=True))
    reader = WindowedAudioFeatures(encoder, waveform, frames, window, context)
    taken = torch.cat([reader.take(count) for count in (9, 12, 12, 12, 15)], dim=1)
    assert taken.shape == (1, frames, encoder.feature_dim)
    with torch.no_grad():
        for start in range(0, frames, window):
            low, high = max(0, start - context), min(frames, start + window + context)
            piece = waveform[:, low * SAMPLES_PER_FRAME : high * SAMPLES_PER_FRAME]
            expected = encoder(piece, high - low, stats)[:, start - low : start - low + window]
            torch.testing.assert_close(taken[:, start : start + window], expected)
        one_window = WindowedAudioFeatures(encoder, waveform, frames, window=frames, context=context)
        torch.testing.assert_close(one_window.take(frames), encoder(waveform, frames))  # short audio: as before
    with pytest.raises(ValueError, match="asked for 1 more frames; only 0 of 60 are left"):
        reader.take(1)
