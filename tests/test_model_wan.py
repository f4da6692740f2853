"""The Wan DiT: real-size parameter counts, profile rules, and equivalence with diffusers' Wan."""


import pytest
import torch

from lipforcing.checkpoints import load_dit_checkpoint
from lipforcing.models import build_student, build_teacher, model_config, random_condition

torch.set_num_threads(1)  # tiny tensors: one thread avoids OpenMP oversubscription on 2 shared cores


def count(model: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize(
    ("profile", "wan_count", "total"),
    [("1.3b", 1_418_996_800, 1_421_383_840), ("14b", 14_288_491_584, 14_294_081_696)],
)
def test_meta_parameter_counts(profile: str, wan_count: int, total: int) -> None:
    model = build_teacher(profile, device="meta")
    assert all(p.is_meta for p in model.parameters())
    cfg = model.cfg
    audio = count(model, "audio_")
    patch_extra = cfg.dim * (cfg.in_channels - cfg.latent_channels) * 4  # 49 new input channels x 1x2x2
    # the plain 16-channel Wan 2.1 T2V count, plus what lip-sync adds (65-channel input, Audio Pack)
    assert count(model) - audio - patch_extra == wan_count
    assert count(model) == total
    assert len(model.audio_cond_projs) == {"1.3b": 14, "14b": 19}[profile]
    assert count(build_student(profile, device="meta")) == total


def test_profiles_and_rope_split() -> None:
    assert model_config("1.3b").rope_split == (44, 42, 42)
    assert model_config("14b").head_dim == 128
    assert model_config("tiny").rope_split == (12, 10, 10)
    assert model_config("tiny").in_channels == 49
    assert model_config("tiny", use_reference_sequence=True).in_channels == 65
    cfg = model_config("tiny")
    cfg.student_timesteps.append(0.5)
    assert model_config("tiny").student_timesteps == [0.999, 0.769]  # profiles are never mutated
    with pytest.raises(ValueError, match="tiny, 1.3b, 14b"):
        model_config("7b")


def test_tiny_forward_uses_every_input() -> None:
    model = build_teacher("tiny").eval()
    cond = random_condition(model.cfg, 1, 21, 8, 8, torch.Generator().manual_seed(0))  # 81 frames at 64x64
    x = torch.randn(1, 16, 21, 8, 8)
    t = torch.tensor([0.5])
    with torch.no_grad():
        v = model(x, t, cond)
        v_frames = model(x, torch.full((1, 21), 0.5), cond)
        v_time = model(x, torch.tensor([0.9]), cond)
        cond.audio.normal_()
        v_audio = model(x, t, cond)
    assert v.shape == x.shape
    assert not torch.allclose(v, v_audio) and not torch.allclose(v, v_time)
    torch.testing.assert_close(v, v_frames)  # per-frame timesteps generalise the per-sample one


def test_matches_diffusers_wan_transformer(tmp_path) -> None:
    """A diffusers-layout checkpoint loads with no renaming left over and computes what diffusers does."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    cfg = model_config("tiny")
    torch.manual_seed(1)
    reference = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        eps=cfg.eps,
    ).eval()
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(reference.state_dict(), str(path))

    model = build_teacher(cfg).eval()
    report = load_dit_checkpoint(model, str(tmp_path))
    assert report.layout == "diffusers"
    assert report.expanded == ["patch_embedding.weight"]
    assert all(k.startswith("audio_") for k in report.initialised)

    x = torch.randn(2, 16, 5, 8, 8)
    t = torch.tensor([0.3, 0.8])
    cond = random_condition(cfg, 2, 5, 8, 8)
    with torch.no_grad():
        expected = reference(x, t * 1000, cond.text, return_dict=False)[0]
        ours = model(x, t, cond)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    """The trainer's `train.activation_checkpointing` wraps every block; gradients must not change."""
    from pipelines.trainer import checkpoint_blocks

    grads = []
    for ckpt in (False, True):
        model = build_student(model_config("tiny"))
        if ckpt:
            checkpoint_blocks(model)
            wrapped = [m for m in model.modules() if type(m).__name__ == "CheckpointWrapper"]
            assert len(wrapped) == model.cfg.num_layers
        cond = random_condition(model.cfg, 1, 6, 4, 4, torch.Generator().manual_seed(0))
        x = torch.randn(1, 16, 6, 4, 4, generator=torch.Generator().manual_seed(1))
        model(
            x, torch.rand(1, 6, generator=torch.Generator().manual_seed(2)), cond
        ).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0
