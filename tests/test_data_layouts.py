"""How the data job lists the training datasets as they are distributed, and how it splits them.

Small trees laid out like VoxCeleb2, HDTF and Hallo3 (plus a generic folder and CSV lists), filled
with one tiny real clip: listing never decodes, so the layout alone decides tags and identities.
The split tests plant their answers: which identity is listed or marked, and which items exist
before files are added.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from data_jobs.config import HASH_EXCLUDE, DataJobConfig, SplitConfig
from data_jobs.inputs import InputItem, detect_layout, list_inputs
from data_jobs.sample import CLIPS, HELDOUT_IDENTITIES, ClipSpec, clip_identity, clip_split, encode_clip
from lipforcing.config import config_hash
from pipelines.jobs import resolve_config


@pytest.fixture(scope="module")
def clip() -> bytes:
    """A real 0.4 s mp4 with audio (no face needed: nothing here decodes it)."""
    spec = ClipSpec("tiny", (), 25, 16000, 1, 0.4, (64, 48), "x", "samples=0")
    return encode_clip(spec, np.random.default_rng(0))[0]


def make_tree(root: Path, paths: list[str], clip: bytes) -> None:
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(clip if path.endswith(".mp4") else b"text\n")


def by_name(items: list[InputItem], root: Path) -> dict[str, InputItem]:
    return {item.video.removeprefix(f"{root}/"): item for item in items}


def assert_identities_on_one_side(items: list[InputItem]) -> None:
    sides = defaultdict(set)
    for item in items:
        sides[(item.dataset, item.identity)].add(item.split)
    assert all(len(s) == 1 for s in sides.values()), {k: s for k, s in sides.items() if len(s) > 1}


VOX = ["id00012/21Uxsk56VDQ/00001.mp4", "id00012/21Uxsk56VDQ/00002.mp4", "id00012/mFDl5uAj3Dk/00001.mp4",
       "id00015/0fijmz4vTVU/00001.mp4"]  # fmt: skip
HDTF = ["WDA_BarackObama_000.mp4", "WDA_BarackObama_001.mp4", "RD_Radio1_000.mp4", "WRA_JoeBiden_000.mp4"]
HALLO3 = ["videos/0001.mp4", "videos/0002.mp4", "caption/0001.txt", "caption/0002.txt", "audios/0002.wav"]


def test_voxceleb2_tree_keeps_the_speaker_id(tmp_path, clip):
    make_tree(tmp_path / "vox2_dev" / "mp4", VOX, clip)
    items = by_name(list_inputs(str(tmp_path / "vox2_dev")), tmp_path / "vox2_dev")
    assert sorted(items) == [f"mp4/{p}" for p in sorted(VOX)]
    assert {i.dataset for i in items.values()} == {"voxceleb2"}
    assert [items[f"mp4/{p}"].identity for p in VOX] == ["id00012", "id00012", "id00012", "id00015"]
    assert len({i.key_stem for i in items.values()}) == 4  # 00001.mp4 of two speakers: distinct keys


def test_hdtf_flat_folder_identity_drops_the_clip_index(tmp_path, clip):
    make_tree(tmp_path / "HDTF", HDTF, clip)
    items = by_name(list_inputs(str(tmp_path / "HDTF")), tmp_path / "HDTF")
    assert {i.dataset for i in items.values()} == {"hdtf"}
    assert {name: i.identity for name, i in items.items()} == {
        "WDA_BarackObama_000.mp4": "WDA_BarackObama",
        "WDA_BarackObama_001.mp4": "WDA_BarackObama",
        "RD_Radio1_000.mp4": "RD_Radio1",
        "WRA_JoeBiden_000.mp4": "WRA_JoeBiden",
    }


def test_hallo3_videos_beside_captions_pair_their_audios(tmp_path, clip):
    make_tree(tmp_path / "hallo3_data", HALLO3, clip)
    items = by_name(list_inputs(str(tmp_path / "hallo3_data")), tmp_path / "hallo3_data")
    assert sorted(items) == ["videos/0001.mp4", "videos/0002.mp4"]
    assert {i.dataset for i in items.values()} == {"hallo3"}
    assert [items[n].identity for n in sorted(items)] == ["0001", "0002"]
    assert items["videos/0001.mp4"].audio is None
    assert items["videos/0002.mp4"].audio == f"{tmp_path}/hallo3_data/audios/0002.wav"


def test_a_mixture_root_recognises_each_sub_folder(tmp_path, clip):
    paths = [f"vox/{p}" for p in VOX] + [f"hdtf/{p}" for p in HDTF] + [f"h3/{p}" for p in HALLO3]
    paths += ["mine/alice/talk.mp4", "mine/bob.mp4", "loose.mp4", "notvox/id1/a/001.mp4", "notvox/x.mp4"]
    make_tree(tmp_path / "raw", paths, clip)
    items = by_name(list_inputs(str(tmp_path / "raw")), tmp_path / "raw")
    tags = {name: (i.dataset, i.identity) for name, i in items.items()}
    assert tags["vox/id00015/0fijmz4vTVU/00001.mp4"] == ("voxceleb2", "id00015")
    assert tags["hdtf/RD_Radio1_000.mp4"] == ("hdtf", "RD_Radio1")
    assert tags["h3/videos/0002.mp4"] == ("hallo3", "0002")
    # Generic folders: tagged by their name, identity = the parent folder under it, else the stem.
    assert tags["mine/alice/talk.mp4"] == ("mine", "alice")
    assert tags["mine/bob.mp4"] == ("mine", "bob")
    assert tags["loose.mp4"] == ("raw", "loose")
    # One video off the layout makes the whole folder generic (a layout is all or nothing).
    assert tags["notvox/id1/a/001.mp4"] == ("notvox", "a") and tags["notvox/x.mp4"] == ("notvox", "x")


def test_layouts_need_their_own_shape():
    assert detect_layout(["videos/0001.mp4"], ["videos/0001.mp4"]) == "folder"  # no caption/ or audios/
    assert detect_layout(["BarackObama_000.mp4"], []) == "folder"  # not an HDTF name
    assert detect_layout(["x/WDA_A_000.mp4"], []) == "folder"  # HDTF is flat
    assert detect_layout(["id00012/v/00001.mp4"], []) == "voxceleb2"
    assert detect_layout(["id00012/00001.mp4"], []) == "folder"  # the video folder is missing


def speakers(count: int, start: int = 0) -> list[str]:
    return [f"id{n:05d}/vid{n}/{c:05d}.mp4" for n in range(start, start + count) for c in (1, 2)]


def test_split_is_by_identity_and_stays_put_when_files_are_added(tmp_path, clip):
    root = tmp_path / "vox"
    make_tree(root, speakers(60), clip)
    config = SplitConfig(heldout_fraction=0.25)
    before = by_name(list_inputs(str(root), config), root)
    assert_identities_on_one_side(list(before.values()))
    held = {i.identity for i in before.values() if i.split == "heldout"}
    assert 5 <= len(held) <= 25  # about a quarter of 60 speakers

    # New speakers and new clips of known speakers: every earlier item keeps its side, and a new
    # clip of a known speaker joins that speaker's side.
    make_tree(root, speakers(40, start=60), clip)
    make_tree(root, [f"id{n:05d}/another/00009.mp4" for n in range(0, 60, 3)], clip)
    after = by_name(list_inputs(str(root), config), root)
    assert len(after) == 120 + 80 + 20
    assert {name: after[name].split for name in before} == {name: i.split for name, i in before.items()}
    for n in range(0, 60, 3):
        expected = "heldout" if f"id{n:05d}" in held else "train"
        assert after[f"id{n:05d}/another/00009.mp4"].split == expected
    assert_identities_on_one_side(list(after.values()))
    assert {i.split for i in after.values()} == {"train", "heldout"}

    nothing = list_inputs(str(root), SplitConfig(heldout_fraction=0.0))
    assert {i.split for i in nothing} == {"train"}


def test_heldout_list_holds_out_whole_identities(tmp_path, clip):
    root = tmp_path / "HDTF"
    make_tree(root, HDTF, clip)
    listed = tmp_path / "hdtf_test.txt"
    listed.write_text("# HDTF test clips\nWDA_BarackObama_001.mp4\n\nRD_Radio1_000\n")  # a name, a stem
    items = by_name(list_inputs(str(root), SplitConfig(heldout_fraction=0.0, heldout_list=str(listed))), root)
    assert {n: i.split for n, i in items.items()} == {
        "WDA_BarackObama_000.mp4": "heldout",  # not listed, but the same identity as _001
        "WDA_BarackObama_001.mp4": "heldout",
        "RD_Radio1_000.mp4": "heldout",
        "WRA_JoeBiden_000.mp4": "train",
    }
    # A CSV list of full paths works the same way; a list that names no input is refused.
    (tmp_path / "test.csv").write_text(f"video\n{root}/WRA_JoeBiden_000.mp4\n")
    items = by_name(list_inputs(str(root), SplitConfig(0.0, str(tmp_path / "test.csv"))), root)
    assert [n for n, i in items.items() if i.split == "heldout"] == ["WRA_JoeBiden_000.mp4"]
    (tmp_path / "wrong.txt").write_text("WDA_Nobody_000.mp4\n")
    with pytest.raises(ValueError, match="names an input"):
        list_inputs(str(root), SplitConfig(0.0, str(tmp_path / "wrong.txt")))


def test_list_split_and_identity_columns(tmp_path, clip):
    make_tree(tmp_path, ["c/a1.mp4", "c/a2.mp4", "c/b1.mp4", "c/b2.mp4", "c/x.mp4", "c/y.mp4"], clip)
    (tmp_path / "list.csv").write_text(
        "video,dataset,identity,split\n"
        "c/a1.mp4,talks,alice,heldout\n"
        "c/a2.mp4,talks,alice,\n"  # unmarked: follows alice's held-out mark
        "c/b1.mp4,talks,bob,train\n"
        "c/b2.mp4,talks,bob,\n"
        "c/x.mp4,talks,007,\n"  # kept as text
        "c/y.mp4,talks,,\n"  # no identity: the stem
        "vox/id00042/v/00001.mp4,voxceleb2,,\n"  # no identity, a VoxCeleb2 path: the speaker id
    )
    # Every unmarked identity would be held out by hash; bob's explicit train mark wins over it.
    items = by_name(list_inputs(str(tmp_path / "list.csv"), SplitConfig(heldout_fraction=1.0)), tmp_path)
    assert {n: (i.identity, i.split) for n, i in items.items()} == {
        "c/a1.mp4": ("alice", "heldout"),
        "c/a2.mp4": ("alice", "heldout"),
        "c/b1.mp4": ("bob", "train"),
        "c/b2.mp4": ("bob", "train"),
        "c/x.mp4": ("007", "heldout"),
        "c/y.mp4": ("y", "heldout"),
        "vox/id00042/v/00001.mp4": ("id00042", "heldout"),
    }
    (tmp_path / "bad.csv").write_text("video,split\nc/a1.mp4,test\n")
    with pytest.raises(ValueError, match="split 'test'"):
        list_inputs(str(tmp_path / "bad.csv"))


def test_split_keys_are_config_keys_inside_the_hash():
    """The split decides what is written where, so another split is another dataset."""
    config = resolve_config(DataJobConfig, ["split.heldout_fraction=0.1", "split.heldout_list=s3://b/test.txt"])
    assert config.split == SplitConfig(heldout_fraction=0.1, heldout_list="s3://b/test.txt")
    digests = {config_hash(c, exclude=HASH_EXCLUDE) for c in (DataJobConfig(), config)}
    assert len(digests) == 2


def test_the_embedded_sample_holds_out_one_face_and_keeps_most_for_training():
    expected = defaultdict(int)
    for spec in CLIPS:
        if spec.expect.startswith("samples="):
            expected[clip_split(spec)] += int(spec.expect.split("=")[1])
    assert expected == {"train": 8, "heldout": 3}
    heldout = {clip_identity(s) for s in CLIPS if clip_split(s) == "heldout"}
    assert heldout == set(HELDOUT_IDENTITIES)
    # No training clip shows a held-out face, not even beside another face.
    assert not {f for s in CLIPS if clip_split(s) == "train" for f in s.faces} & heldout
