"""The lip-sync condition of a stream, chunk by chunk, in memory that does not grow with its length.

`LatentEncoder.condition` encodes a whole clip at once: right for 5-second training windows, not for
a 10-minute video. Here each chunk's source crops go through VAE stream encoders (the mouth-masked
video and, for 65-channel students, the unmasked reference sequence) and the wav2vec2 features come
a window at a time (`WindowedAudioFeatures`). Chunk c of 3 latent frames covers video frames [0, 9)
for c = 0 and [12c - 3, 12c + 9) after it (1 + 4k frames, then 4k: the VAE's first frame is encoded
alone), so the streamed condition is the whole clip's, exactly so while the audio fits one window.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lipforcing.data.encode import LatentEncoder
from lipforcing.models.audio import WindowedAudioFeatures, pack_audio
from lipforcing.models.conditioning import Condition
from lipforcing.models.vae import mask_to_latent


def chunk_frame_counts(num_frames: int, chunk_latents: int) -> list[int]:
    """Video frames of each chunk of a 4k + 1-frame clip: 9, 12, 12, ... (the last may be shorter)."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"a clip of {num_frames} video frames is not 1 + 4k")
    latents = (num_frames - 1) // 4 + 1
    counts = [4 * min(chunk_latents, latents - start) for start in range(0, latents, chunk_latents)]
    counts[0] -= 3  # the first latent frame holds one video frame
    return counts


class ConditionStream:
    """Conditions of consecutive chunks of one clip: call `next` with each chunk's source crops."""

    def __init__(self, encoder: LatentEncoder, reference: Tensor, waveform: Tensor, num_frames: int,
                 audio_window: int = 250, audio_context: int = 50):  # fmt: skip
        """reference [B, 1, 3, S, S] in [0, 1] (the identity frame); waveform [B, samples] at 16 kHz,
        exactly `num_frames` video frames long."""
        self.encoder, device = encoder, encoder.device
        with torch.no_grad():
            self.reference = encoder.vae.encode(reference.to(device))
        self.masked = encoder.vae.stream_encoder()
        self.sequence = encoder.vae.stream_encoder() if encoder.model.use_reference_sequence else None
        self.audio = WindowedAudioFeatures(encoder.audio_encoder, waveform.to(device), num_frames, audio_window, audio_context)
        self.first = True

    @torch.no_grad()
    def next(self, frames: Tensor) -> Condition:
        """The condition of the next chunk; frames [B, n, 3, S, S] in [0, 1] (1 + 4k first, then 4k)."""
        encoder, frames = self.encoder, frames.to(self.encoder.device)
        batch = frames.shape[0]
        audio = pack_audio(self.audio.take(frames.shape[1]), encoder.model.audio_frames_per_latent, first=self.first)
        self.first = False
        return Condition(
            reference=self.reference,
            mask=mask_to_latent(encoder.pixel_mask).expand(batch, -1, -1, -1, -1),
            masked_video=self.masked.encode_masked(frames, encoder.pixel_mask.unsqueeze(1)),
            audio=audio,
            text=encoder.text.expand(batch, -1, -1),
            reference_sequence=None if self.sequence is None else self.sequence.encode(frames),
        )
