"""Face parsing for occlusion-aware paste-back: the released checkpoint's layout, loading by path, the
surface classes, and the time-smoothed, feathered mask built from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lipforcing.inference.paste import blend_mask, occlusion_mask
from lipforcing.models.face_parsing import CLASSES, SURFACE, BiSeNet, load_face_parser

# Names and shapes of the public CelebAMask-HQ checkpoint (79999_iter.pth); no spatial path (`sp.*`).
RELEASED = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
    "cp.arm32.conv_atten.weight": (128, 128, 1, 1),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "cp.conv_head16.conv.weight": (128, 128, 3, 3),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "conv_out.conv_out.weight": (19, 256, 1, 1),
    "conv_out16.conv.conv.weight": (64, 128, 3, 3),
}


def test_the_module_has_the_released_checkpoints_layout():
    state = BiSeNet().state_dict()
    assert {name: tuple(state[name].shape) for name in RELEASED} == RELEASED
    assert not any(name.startswith("sp.") for name in state)
    assert [CLASSES[i] for i in SURFACE] == ["skin", "nose", "mouth", "u_lip", "l_lip"] and CLASSES[17] == "hair"


def test_a_checkpoint_loads_by_path_and_a_foreign_one_is_refused(tmp_path):
    torch.manual_seed(0)
    model = BiSeNet().eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}  # as old checkpoints
    torch.save(state, tmp_path / "79999_iter.pth")
    loaded = load_face_parser(str(tmp_path / "79999_iter.pth"))
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(image), model(image))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a BiSeNet face-parsing checkpoint .config key 'parsing_weights'"):
        load_face_parser(str(tmp_path / "other.pth"))
    with pytest.raises(FileNotFoundError, match="parsing_weights"):
        load_face_parser(str(tmp_path / "missing.pth"))


class PlantedParser(BiSeNet):
    """Logits that name a known class per pixel: skin everywhere, hair (an occluder) in one block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], len(CLASSES), *x.shape[2:])
        logits[:, CLASSES.index("skin")] = 1.0
        logits[:, CLASSES.index("hair"), 300:400, 200:300] = 2.0  # at the parser's 512 px
        return logits


def test_surface_keeps_what_covers_the_face():
    surface = PlantedParser().surface(torch.rand(2, 3, 128, 128))  # crops at 128 px: block at 75:100, 50:75
    assert surface.shape == (2, 128, 128)
    assert surface[:, 75:100, 50:75].max() == 0 and surface[:, :70].min() == 1 and surface[:, :, 80:].min() == 1


def test_the_occlusion_mask_follows_a_lasting_occluder_and_stays_inside_the_box():
    size, box = 64, blend_mask(64, [0.55, 0.95, 0.2, 0.8])
    surface = np.ones((9, size, size), np.float32)
    surface[2:7, 40:56, 20:44] = 0  # a hand over the mouth in frames 2-6
    masks = [occlusion_mask(list(surface[max(0, t - 1) : t + 2]), box) for t in range(9)]  # as infer: t-1..t+1
    assert all(np.all(mask <= box + 1e-6) for mask in masks)  # never past the mouth box
    assert masks[4][46:50, 28:36].max() < 0.05  # the hand stays in front where it lasts
    assert masks[8][46:50, 28:36].min() > 0.9  # gone two frames later: the mouth is replaced again
    assert np.isclose(masks[1][50, 32], box[50, 32] * 2 / 3, atol=0.05)  # frame 1 averages frames 0-2 (one covered)
    assert np.isclose(masks[0][50, 32], box[50, 32], atol=0.05)  # frame 0 averages frames 0-1 (none covered)
