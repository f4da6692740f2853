"""taew2_1 layout: key names and shapes of the real checkpoint, load round trip, TGrow fitting."""

import pytest
import torch

from lipforcing.checkpoints import fit_tgrow, load_tae
from lipforcing.models import build_tae
from lipforcing.models.tae import TinyAutoencoder

torch.set_num_threads(1)  # tiny tensors: one thread avoids OpenMP oversubscription on 2 shared cores

# a sample of taew2_1.pth's keys (madebyollin/taehv layout: nn.Sequential indices) and their shapes
TAEW2_1_KEYS = {
    "encoder.0.weight": (64, 3, 3, 3),
    "encoder.2.conv.weight": (64, 128, 1, 1),  # TPool stride 2
    "encoder.4.conv.0.weight": (64, 128, 3, 3),  # MemBlock: conv over (frame, past)
    "encoder.12.conv.weight": (64, 64, 1, 1),  # TPool stride 1
    "encoder.17.weight": (16, 64, 3, 3),
    "decoder.1.weight": (256, 16, 3, 3),
    "decoder.3.conv.4.bias": (256,),
    "decoder.7.conv.weight": (256, 256, 1, 1),  # TGrow stride 1
    "decoder.8.weight": (128, 256, 3, 3),
    "decoder.13.conv.weight": (256, 128, 1, 1),  # TGrow stride 2
    "decoder.19.conv.weight": (128, 64, 1, 1),
    "decoder.22.weight": (3, 64, 3, 3),
}


def test_real_size_key_layout() -> None:
    with torch.device("meta"):
        state = TinyAutoencoder((256, 128, 64, 64)).state_dict()
    for key, shape in TAEW2_1_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(".skip." in k for k in state)  # every MemBlock keeps its width: identity skips


def test_taew2_1_round_trip(tmp_path) -> None:
    source = build_tae("tiny")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    torch.save(source.state_dict(), tmp_path / "taew2_1.pth")
    loaded = load_tae(tmp_path / "taew2_1.pth", (32, 16, 8, 8))
    z = torch.randn(1, 16, 3, 4, 4)
    with torch.no_grad():
        frames = loaded.decode(z)
        torch.testing.assert_close(frames, source.decode(z), rtol=0, atol=0)
    assert frames.shape == (1, 9, 3, 32, 32) and 0 <= frames.min() and frames.max() <= 1
    with pytest.raises(FileNotFoundError, match="taew2_1_missing"):
        load_tae(tmp_path / "taew2_1_missing.pth")


def test_fit_tgrow_keeps_last_frames() -> None:
    tae = TinyAutoencoder((32, 16, 8, 8))
    wide = torch.randn(64, 32, 1, 1)  # a stride-2 TGrow where ours has stride 1
    fitted = fit_tgrow(tae, {"decoder.7.conv.weight": wide})
    assert torch.equal(fitted["decoder.7.conv.weight"], wide[32:])


def test_decode_frame_counts_and_streaming_match() -> None:
    tae = build_tae("tiny")
    z = torch.randn(2, 16, 6, 4, 4)
    with torch.no_grad():
        full = tae.decode(z)
        stream = tae.stream_decoder()
        first, second = stream.decode(z[:, :, :3]), stream.decode(z[:, :, 3:])
        video = torch.rand(1, 9, 3, 32, 32)
        latents = tae.encode(video)
    assert full.shape[1] == 4 * 6 - 3
    assert (first.shape[1], second.shape[1]) == (9, 12)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full)
    assert latents.shape == (1, 16, 3, 4, 4)
