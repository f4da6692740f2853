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
