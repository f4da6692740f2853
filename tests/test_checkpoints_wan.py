"""Wan-layout checkpoints: round trips through every file format, and 16 -> 49 channel growth."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lipforcing.checkpoints import expand_input_channels, load_dit_checkpoint, read_state_dict
from lipforcing.models import build_student, build_teacher, model_config, random_condition

torch.set_num_threads(1)  # tiny tensors: one thread avoids OpenMP oversubscription on 2 shared cores


def outputs(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cond = random_condition(model.cfg, 1, 5, 4, 4, g)
    with torch.no_grad():
        return model(torch.randn(1, 16, 5, 4, 4, generator=g), torch.tensor([0.7]), cond)


def write(state: dict, path, fmt: str) -> str:
    """Write state in one of the layouts public checkpoints ship as; returns what to load."""
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        save_file(state, str(path / "model.safetensors"))
        return str(path / "model.safetensors")
    if fmt == "pth":
        torch.save(state, path / "model.pth")
        return str(path / "model.pth")
    keys = sorted(state)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(path / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return str(path)  # the folder: the loader finds the index


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "sharded"])
def test_wan_layout_round_trip(tmp_path, fmt: str) -> None:
    source = build_teacher(model_config("tiny", seed=1)).eval()
    path = write(source.state_dict(), tmp_path, fmt)
    target = build_teacher(model_config("tiny", seed=2)).eval()
    assert not torch.equal(outputs(source), outputs(target))
    report = load_dit_checkpoint(target, path)
    assert report.layout == "wan" and report.expanded == [] and report.initialised == []
    assert torch.equal(outputs(source), outputs(target))
    student = build_student("tiny", weights=path)  # the student reads the teacher's names as they are
    assert all(torch.equal(student.state_dict()[k], v) for k, v in source.state_dict().items())


def test_plain_wan_checkpoint_grows_to_49_channels(tmp_path) -> None:
    """A 16-channel T2V checkpoint without audio modules: new inputs start at zero, so they do nothing."""
    cfg = model_config("tiny")
    source = build_teacher(cfg)
    plain = {k: v for k, v in source.state_dict().items() if not k.startswith("audio_")}
    plain["patch_embedding.weight"] = plain["patch_embedding.weight"][:, :16].clone()
    save_file(plain, str(tmp_path / "wan_t2v.safetensors"))

    model = build_teacher(model_config("tiny", seed=3)).eval()
    report = load_dit_checkpoint(model, str(tmp_path / "wan_t2v.safetensors"))
    assert report.expanded == ["patch_embedding.weight"]
    assert report.initialised and all(k.startswith("audio_") for k in report.initialised)
    weight = model.patch_embedding.weight
    assert torch.equal(weight[:, :16], plain["patch_embedding.weight"])
    assert weight.shape[1] == 49 and not weight[:, 16:].any()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 5, 4, 4, generator=g)
    cond_a, cond_b = random_condition(cfg, 1, 5, 4, 4, g), random_condition(cfg, 1, 5, 4, 4, g)
    cond_b.text = cond_a.text  # everything but the text differs: reference, mask, masked video, audio
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, torch.tensor([0.5]), cond_a), model(x, torch.tensor([0.5]), cond_b)
        )


def test_expand_input_channels_to_65() -> None:
    w = torch.randn(8, 49, 1, 2, 2)
    grown = expand_input_channels(w, 65)
    assert grown.shape == (8, 65, 1, 2, 2) and torch.equal(grown[:, :49], w) and not grown[:, 49:].any()
    with pytest.raises(ValueError):
        expand_input_channels(w, 16)


def test_loader_errors_name_the_problem(tmp_path) -> None:
    model = build_teacher("tiny")
    missing = tmp_path / "nowhere" / "wan.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dit_checkpoint(model, str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_teacher("tiny", weights=str(missing))
    state = dict(model.state_dict())
    state["blocks.0.self_attn.extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match="blocks.0.self_attn.extra"):
        load_dit_checkpoint(model, state)
    del state["blocks.0.self_attn.extra"], state["blocks.0.ffn.0.weight"]
    with pytest.raises(KeyError, match="blocks.0.ffn.0.weight"):
        load_dit_checkpoint(model, state)


def test_wrapper_prefix_is_stripped(tmp_path) -> None:
    source = build_teacher("tiny")
    save_file(
        {f"module.{k}": v.contiguous() for k, v in source.state_dict().items()},
        str(tmp_path / "w.safetensors"),
    )
    assert set(read_state_dict(tmp_path / "w.safetensors")) == {f"module.{k}" for k in source.state_dict()}
    target = build_teacher(model_config("tiny", seed=5))
    load_dit_checkpoint(target, str(tmp_path / "w.safetensors"))
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())


def test_reads_checkpoints_from_urls(tmp_path) -> None:
    """Weights may live behind any fsspec URL (s3:// on a cluster); memory:// stands in for one here."""
    import fsspec

    source = build_teacher("tiny")
    local = write(source.state_dict(), tmp_path, "sharded")
    fs = fsspec.filesystem("memory")
    for name in ("a.safetensors", "b.safetensors", "model.safetensors.index.json"):
        fs.pipe_file(f"/ckpt/{name}", (tmp_path / name).read_bytes())
    assert read_state_dict(local).keys() == read_state_dict("memory://ckpt").keys()
    target = build_teacher(model_config("tiny", seed=9), weights="memory://ckpt")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    with pytest.raises(FileNotFoundError, match="model.dit_weights"):
        build_teacher("tiny", weights="memory://nothing/here.safetensors")


@pytest.mark.parametrize("peft_default_infix", [True, False])
def test_omniavatar_adapter_merges_onto_the_wan_base(tmp_path, peft_default_infix: bool) -> None:
    """An OmniAvatar-format checkpoint (LoRA A/B, audio modules, patch embedding widened to 65 inputs)
    on top of a 16-channel Wan 2.1 base loads merged as W + alpha/r B A: the same weights peft's own
    merge gives for the same adapter (the oracle), with or without peft's `.default` in the keys."""
    from lipforcing.models.lora import apply_lora, export_state_dict

    cfg = model_config("tiny", use_reference_sequence=True)
    base = {k: v for k, v in build_teacher(model_config("tiny", seed=1)).state_dict().items() if not k.startswith("audio_")}
    base["patch_embedding.weight"] = base["patch_embedding.weight"][:, :16].clone()
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "wan2.1_t2v.safetensors"))

    oracle = build_teacher(cfg, weights=str(tmp_path / "wan2.1_t2v.safetensors"))
    rank, alpha = 8, 4  # OmniAvatar's scale alpha / r = 64 / 128 = 0.5
    apply_lora(oracle, rank, alpha)
    g = torch.Generator().manual_seed(3)
    adapter = {}
    with torch.no_grad():
        for name, param in oracle.named_parameters():
            if param.requires_grad:  # LoRA A/B, audio modules, patch embedding: what OmniAvatar trains
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
                key = name if peft_default_infix else name.replace(".default", "")
                adapter[key] = param.detach().clone()
    assert any(".lora_B." in k for k in adapter) and adapter["patch_embedding.weight"].shape[1] == 65
    torch.save(adapter, tmp_path / "pytorch_model.pt")
    expected = export_state_dict(oracle)

    loaded = build_teacher(
        model_config(
            "tiny", use_reference_sequence=True, dit_weights=str(tmp_path / "wan2.1_t2v.safetensors"),
            dit_adapter=str(tmp_path / "pytorch_model.pt"), dit_adapter_alpha=alpha,
        )
    )  # fmt: skip
    state = loaded.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(state["blocks.0.self_attn.q.weight"], base["blocks.0.self_attn.q.weight"])
    torch.testing.assert_close(outputs(loaded), outputs(oracle.eval()), rtol=1e-4, atol=1e-5)


def test_adapter_errors_name_the_problem(tmp_path) -> None:
    base = build_teacher(model_config("tiny")).state_dict()
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    torch.save({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64)}, tmp_path / "half.pt")
    with pytest.raises(KeyError, match="lora_A but not its pair for blocks.0.self_attn.q"):
        load_dit_checkpoint(build_teacher("tiny"), str(tmp_path / "base.safetensors"), str(tmp_path / "half.pt"))
    with pytest.raises(ValueError, match="model.dit_adapter is set but model.dit_weights is empty"):
        build_teacher(model_config("tiny", dit_adapter=str(tmp_path / "half.pt")))
