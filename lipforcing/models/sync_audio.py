"""Audio features for the SyncNets, at 100 feature frames per second (4 per video frame at 25 fps).

`syncnet_mfcc` reproduces the MFCCs the public syncnet_v2 weights were trained on: syncnet_python
reads the wav as int16 and runs python_speech_features on those int16-scale values (25 ms frames,
10 ms step, 0.97 pre-emphasis, 26 mel filters, 512-point FFT, 13 cepstra, lifter 22, c0 replaced by
log frame energy). Our float audio in [-1, 1] is scaled by 32768 first: unscaled, every coefficient's
log energy comes out ln(32768^2) = 20.79 lower, inputs those weights never saw. `log_mel` feeds our
trainable SyncNet, which learns its own scale.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.fft import dct

from lipforcing.data import SAMPLE_RATE

FEATURES_PER_SECOND = 100
INT16_SCALE = 32768.0  # float audio in [-1, 1] -> the int16 sample values syncnet_python computes on


def syncnet_mfcc(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """MFCC [13, frames] of mono audio (float in [-1, 1], or int16) as syncnet_python computes it:
    python_speech_features on int16-scale values."""
    frame_len, step, nfft, filters, cepstra = int(0.025 * sample_rate), int(0.01 * sample_rate), 512, 26, 13
    samples = audio.astype(np.float64) if audio.dtype == np.int16 else audio.astype(np.float64) * INT16_SCALE
    signal = np.append(samples[:1], samples[1:] - 0.97 * samples[:-1])
    count = 1 + int(np.ceil((max(len(signal), frame_len) - frame_len) / step))
    padded = np.concatenate([signal, np.zeros((count - 1) * step + frame_len - len(signal))])
    index = np.arange(frame_len)[None, :] + step * np.arange(count)[:, None]
    frames = padded[index]
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    energy = np.where(power.sum(1) == 0, np.finfo(float).eps, power.sum(1))
    features = power @ _mel_filterbank(filters, nfft, sample_rate).T
    features = np.where(features == 0, np.finfo(float).eps, features)
    ceps = dct(np.log(features), type=2, axis=1, norm="ortho")[:, :cepstra]
    lift = 1 + (22 / 2.0) * np.sin(np.pi * np.arange(cepstra) / 22)
    ceps = ceps * lift
    ceps[:, 0] = np.log(energy)
    return ceps.T.astype(np.float32)


def log_mel(audio: np.ndarray | torch.Tensor, mel_bins: int = 40, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Log-mel spectrogram [mel_bins, frames] at 100 frames/s (librosa: 512-point FFT over 25 ms Hann
    windows, centred, so frame i sits at i * 10 ms), for our trainable SyncNet."""
    import librosa

    waveform = np.asarray(audio, dtype=np.float32)
    step = sample_rate // FEATURES_PER_SECOND
    power = librosa.feature.melspectrogram(
        y=waveform, sr=sample_rate, n_fft=512, hop_length=step, win_length=int(0.025 * sample_rate),
        window="hann", center=True, power=2.0, n_mels=mel_bins, htk=True, norm=None,
    )  # fmt: skip
    return torch.from_numpy(np.log(power + 1e-6)).float()[:, : len(waveform) // step]


def _mel_filterbank(count: int, nfft: int, sample_rate: int) -> np.ndarray:
    """python_speech_features' triangular filters [count, nfft//2+1]: evenly spaced on the mel scale,
    edges floored to FFT bins (what syncnet_v2 was trained on; librosa's filters differ slightly)."""

    def to_mel(hz):
        return 2595 * np.log10(1 + hz / 700.0)

    def to_hz(mel):
        return 700 * (10 ** (mel / 2595.0) - 1)

    edges = to_hz(np.linspace(to_mel(0), to_mel(sample_rate / 2), count + 2))
    bins = np.floor((nfft + 1) * edges / sample_rate).astype(int)
    bank = np.zeros((count, nfft // 2 + 1))
    for j in range(count):
        left, centre, right = bins[j], bins[j + 1], bins[j + 2]
        for i in range(left, centre):
            bank[j, i] = (i - left) / max(centre - left, 1)
        for i in range(centre, right):
            bank[j, i] = (right - i) / max(right - centre, 1)
    return bank
