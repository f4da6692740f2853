"""Config: defaults <- YAML <- overrides, validation errors that name the key, stable hashes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from lipforcing.config import ConfigError, config_hash, load_config, to_yaml
from pipelines.jobs import resolve_config


@dataclass
class Optim:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    zero_stage: Literal[0, 1, 2, 3] = 2


@dataclass
class Job:
    profile: str = "tiny"
    output: str = "outputs/x"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)

    @classmethod
    def for_profile(cls, profile: str) -> Job:
        return cls(profile=profile, steps={"tiny": 10, "1.3b": 5000, "14b": 5000}[profile])


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 0.001\n")
    config = load_config(Job, files=[path], overrides=["optim.lr=0.5", "optim.betas=[0.0,0.999]"])
    assert config.steps == 20
    assert config.optim.lr == 0.5
    assert config.optim.betas == [0.0, 0.999]
    assert isinstance(config.optim, Optim)


def test_unknown_key_names_it_and_lists_allowed():
    with pytest.raises(ConfigError) as info:
        load_config(Job, overrides=["optim.learning_rate=1"])
    message = str(info.value)
    assert "optim.learning_rate" in message
    assert "betas, lr, zero_stage" in message


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml.*'stepz'"):
        load_config(Job, files=[path])


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError) as info:
        load_config(Job, overrides=["steps=many"])
    assert "steps" in str(info.value)
    assert "int" in str(info.value)


def test_choices_are_enforced_with_allowed_values():
    with pytest.raises(ConfigError, match=r"optim.zero_stage.*allowed values: 0, 1, 2, 3"):
        load_config(Job, overrides=["optim.zero_stage=4"])


def test_empty_override_is_an_empty_string():
    assert load_config(Job, overrides=["output="]).output == ""


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Job, overrides=["steps"])


def test_hash_is_stable_and_sensitive():
    a = load_config(Job, overrides=["steps=3"])
    b = load_config(Job, overrides=["steps=3"])
    c = load_config(Job, overrides=["steps=4"])
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(c)
    moved = load_config(Job, overrides=["steps=3", "output=s3://elsewhere"])
    assert config_hash(a, exclude=["output"]) == config_hash(moved, exclude=["output"])
    assert config_hash(a) != config_hash(moved)


def test_yaml_round_trip(tmp_path):
    config = load_config(Job, overrides=["optim.lr=0.25"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(config))
    assert load_config(Job, files=[path]) == config


def test_profile_selects_defaults_and_is_validated():
    assert resolve_config(Job, ["profile=1.3b"]).steps == 5000
    assert resolve_config(Job, ["profile=1.3b", "steps=7"]).steps == 7
    with pytest.raises(ConfigError, match="allowed values: tiny, 1.3b, 14b"):
        resolve_config(Job, ["profile=7b"])


def test_profile_yaml_sections_a_job_lacks_are_ignored():
    config = load_config(Job, lenient_files=[{"steps": 4, "model": {"dim": 8}}])
    assert config.steps == 4


@dataclass
class Listing:
    names: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    title: str = ""


def test_one_value_for_a_list_key_is_a_list_of_one():
    url = "s3://bucket/talk, take 2.mp4?versionId=x'y"
    config = load_config(Listing, overrides=[f"names={url}", "tags=job=eval", "title=a,b"])
    assert config.names == [url] and config.tags == ["job=eval"] and config.title == "a,b"
    assert load_config(Listing, overrides=["names=[a,b]"]).names == ["a", "b"]
