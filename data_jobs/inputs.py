"""What to ingest: a folder / object-store prefix of videos, or a CSV/Parquet list.

- Folder: every file with a video extension, recursively. A video without an audio stream is
  paired with a same-named audio file beside it (`clip.mp4` + `clip.wav`). The root, or else each
  first sub-folder under it, is recognised by how the training datasets are distributed, and its
  videos are tagged with that dataset:
    voxceleb2  `[...]/id00012/21Uxsk56VDQ/00001.mp4`     identity: the speaker id (`id00012`)
    hdtf       flat `WDA_BarackObama_000.mp4` (RD_/WDA_/WRA_)  identity: the name less its clip
               index (`WDA_BarackObama`)
    hallo3     `[<subset>/]videos/0001.mp4` beside `caption/0001.txt` (or `audios/0001.wav`,
               which is paired)                             identity: the video id (`0001`)
  A folder that follows none of them is tagged with its name (`raw/mine/x.mp4` -> `mine`, files
  at the top: the root's name); identity: the video's parent folder under it, else its stem.
  A layout is recognised only when every video under the folder follows it.
- List: columns `video`, optional `audio`, `dataset`, `identity` and `split` (`train` /
  `heldout`); relative paths are relative to the list. Without `identity`: the rule of the row's
  dataset tag when it names one of the layouts above, else the file stem.

Split: every (dataset, identity) lies on one side. Held out: identities with a held-out mark (a
`split` of `heldout`, or a video named in `split.heldout_list`); else train when marked `train`;
else a hash of `dataset/identity` below `split.heldout_fraction`. Nothing but an identity's own marks
moves it, so adding inputs never moves an earlier one.

Refused inputs come back too, as items whose `problem` is "reason: detail", so the job reports
them as reject rows of stage `input` instead of dropping them in silence:
- `duplicate`: a video listed more than once; its first row is a normal item, each later row a
  refused one ("duplicate: listed N times in <list>").
- `unsupported_extension`: a file under a folder input whose extension is neither a video one
  (`VIDEO_EXTENSIONS`, every container FFmpeg reads that talking-head data comes in), an audio one
  (`AUDIO_EXTENSIONS`: pairing candidates), nor a sidecar one kept beside videos on purpose
  (`SIDECAR_EXTENSIONS`: transcripts, metadata, thumbnails, landmarks); hidden files and folders
  (`.DS_Store`, `.cache/`) are skipped. A list names its files itself: nothing in it is refused
  for its extension, and a listed file that does not exist is the probe's `missing_file` reject.

Inputs come back sorted by URL (a duplicate after its first row), so the partition into tasks,
and with it every shard name, is a pure function of the input list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import posixpath
import re
from dataclasses import dataclass

import pandas as pd

from data_jobs.config import SplitConfig
from lipforcing import storage

log = logging.getLogger("lipforcing.data")

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".flv", ".ts", ".mts", ".m2ts",
                    ".3gp", ".3g2", ".mpg", ".mpeg", ".wmv", ".ogv")  # fmt: skip
AUDIO_EXTENSIONS = (".wav", ".flac", ".m4a", ".mp3", ".aac", ".ogg", ".opus")
# Files a dataset keeps beside its videos (transcripts, metadata, landmarks, thumbnails): skipped
# on purpose. Any other file under a folder input is reported as `unsupported_extension`.
SIDECAR_EXTENSIONS = (".txt", ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".md", ".yaml", ".yml",
                      ".xml", ".srt", ".vtt", ".jpg", ".jpeg", ".png", ".npy", ".npz", ".pkl")  # fmt: skip
LIST_EXTENSIONS = (".csv", ".parquet")

TRAIN, HELDOUT = "train", "heldout"
UNMARKED = ""  # no split given for this input: its identity's marks or the hash decide
# Paths relative to the dataset's folder, as each dataset is distributed.
VOXCELEB2 = re.compile(r"(?:^|/)(id\d+)/[^/]+/\d+\.[^/.]+$")
HDTF = re.compile(r"^(?:RD|WDA|WRA)_[^/]+$")
HALLO3 = re.compile(r"^(?:(.+)/)?videos/[^/]+$")
LAYOUTS = ("voxceleb2", "hdtf", "hallo3")


@dataclass(frozen=True)
class InputItem:
    video: str
    dataset: str
    audio: str | None = None
    key_stem: str = ""
    identity: str = ""  # who is on screen: all of an identity's clips lie on one side of the split
    split: str = "train"  # or "heldout": written to its own shard set
    problem: str = ""  # "reason: detail" for an input the listing refuses (it becomes a reject row)


def list_inputs(url: str, split: SplitConfig | None = None) -> list[InputItem]:
    """Every input with its dataset tag, identity and split (`split`: the defaults when None)."""
    if not storage.exists(url):
        raise FileNotFoundError(f"input {url} does not exist")
    url = canonical_url(url)
    if url.lower().endswith(LIST_EXTENSIONS):
        items = _from_list(url)
        root = posixpath.dirname(url.rstrip("/"))
    else:
        items = _from_folder(url)
        root = url
    items = sorted(_mark_duplicates(items, url), key=lambda item: item.video)  # stable: first stays first
    return [_with_key(item, root) for item in assign_splits(items, split or SplitConfig())]


def canonical_url(url: str) -> str:
    """Local paths made absolute (what fsspec's glob returns), remote URLs as given."""
    return storage.filesystem(url)[1] if storage.is_local(url) else url.rstrip("/")


def key_stem(video: str, root: str) -> str:
    """A WebDataset-safe, stable stem: readable file stem + hash of the path relative to the root
    (so the same tree on local disk and on S3 gives the same keys)."""
    relative = posixpath.relpath(video, root.rstrip("/")) if video.startswith(root.rstrip("/")) else video
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", posixpath.splitext(posixpath.basename(video))[0])[:48]
    return f"{stem}-{hashlib.sha1(relative.encode()).hexdigest()[:8]}"


def identity(layout: str, path: str) -> str:
    """Who a video shows, by its dataset's naming: VoxCeleb2's speaker id, HDTF's video name less
    its clip index, else the file stem (Hallo3's video id)."""
    stem = posixpath.splitext(posixpath.basename(path))[0]
    speaker = VOXCELEB2.search(path) if layout == "voxceleb2" else None
    if speaker:
        return speaker.group(1)
    return re.sub(r"_\d+$", "", stem) if layout == "hdtf" else stem


def detect_layout(videos: list[str], files: list[str]) -> str:
    """The dataset layout every video follows ("folder" if none); paths relative to one folder."""
    if not videos:
        return "folder"
    if all(VOXCELEB2.search(video) for video in videos):
        return "voxceleb2"
    if all(HDTF.match(video) for video in videos):
        return "hdtf"
    folders = {posixpath.dirname(f) for f in files}
    subsets = [HALLO3.match(video) for video in videos]
    if all(m and {posixpath.join(m.group(1) or "", n) for n in ("caption", "audios")} & folders for m in subsets):
        return "hallo3"
    return "folder"


def dataset_folders(videos: list[str], files: list[str]) -> dict[str, tuple[str, list[str]]]:
    """{folder: (layout, its videos relative to it)}: the root ("") when all its videos follow one
    layout, else each first sub-folder on its own (files at the top form a generic dataset)."""
    layout = detect_layout(videos, files)
    if layout in LAYOUTS:
        return {"": (layout, videos)}
    groups: dict[str, list[str]] = {}
    for video in videos:
        folder, _, name = video.partition("/") if "/" in video else ("", "", video)
        groups.setdefault(folder, []).append(name)
    inside = {folder: [f[len(folder) + 1 :] for f in files if f.startswith(f"{folder}/")] for folder in groups if folder}
    return {folder: (detect_layout(names, inside[folder]) if folder else "folder", names) for folder, names in groups.items()}


def heldout_by_hash(dataset: str, identity: str, fraction: float) -> bool:
    """Whether an identity is in the hashed held-out share: a function of its name alone."""
    digest = hashlib.sha1(f"{dataset}/{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def assign_splits(items: list[InputItem], config: SplitConfig) -> list[InputItem]:
    """Each item's split, decided per (dataset, identity) so no identity lies on both sides: held
    out if any of its inputs is marked so or listed in `heldout_list`, train if marked train,
    else by hash."""
    listed = _heldout_entries(config.heldout_list) if config.heldout_list else set()
    matched: set[str] = set()
    marks: dict[tuple[str, str], set[str]] = {}
    for item in items:
        hits = listed & _path_tails(item.video)
        matched |= hits
        mark = HELDOUT if hits else item.split
        if mark != UNMARKED:
            marks.setdefault((item.dataset, item.identity), set()).add(mark)
    if listed and not matched:
        raise ValueError(f"split.heldout_list {config.heldout_list}: none of its {len(listed)} entries names an input")
    if listed - matched:
        log.warning("split.heldout_list: %d entries name no input, e.g. %s", len(listed - matched), sorted(listed - matched)[:3])

    def side(key: tuple[str, str]) -> str:
        given = marks.get(key, set())
        if given:
            return HELDOUT if HELDOUT in given else TRAIN
        return HELDOUT if heldout_by_hash(*key, config.heldout_fraction) else TRAIN

    return [dataclasses.replace(item, split=side((item.dataset, item.identity))) for item in items]


def _path_tails(video: str) -> set[str]:
    """Every trailing part of a path, with and without its extension: what a list entry may name."""
    parts = video.split("/")
    tails = {"/".join(parts[i:]) for i in range(len(parts))}
    return tails | {posixpath.splitext(tail)[0] for tail in tails}


def _heldout_entries(url: str) -> set[str]:
    """A held-out list: a CSV/Parquet `video` column, or a text file of one path a line (# comments)."""
    if url.lower().endswith(LIST_EXTENSIONS):
        table = _read_table(url)
        if "video" not in table.columns:
            raise ValueError(f"split.heldout_list {url} needs a 'video' column (has {list(table.columns)})")
        lines = [str(v) for v in table["video"] if pd.notna(v)]
    else:
        lines = storage.read_text(url).splitlines()
    entries = (line.strip() for line in lines)
    return {entry.removeprefix("./") for entry in entries if entry and not entry.startswith("#")}


def _with_key(item: InputItem, root: str) -> InputItem:
    return dataclasses.replace(item, key_stem=key_stem(item.video, root))


def _mark_duplicates(items: list[InputItem], url: str) -> list[InputItem]:
    """The first row of each video as listed; every later row of it as an item with a problem."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item.video] = counts.get(item.video, 0) + 1
    seen: set[str] = set()
    marked = []
    for item in items:
        if item.video in seen:
            problem = f"duplicate: listed {counts[item.video]} times in {url}"
            item = dataclasses.replace(item, problem=problem)
        seen.add(item.video)
        marked.append(item)
    return marked


def _from_folder(url: str) -> list[InputItem]:
    base = url.rstrip("/")
    files = storage.glob(f"{base}/**")
    by_stem = {posixpath.splitext(f)[0]: f for f in files if f.lower().endswith(AUDIO_EXTENSIONS)}
    folders = {posixpath.dirname(f) for f in files}
    relative = [f[len(base) + 1 :] for f in files]
    videos = [f for f in relative if f.lower().endswith(VIDEO_EXTENSIONS)]
    items = []
    for folder, (layout, names) in dataset_folders(videos, relative).items():
        dataset = layout if layout in LAYOUTS else folder or posixpath.basename(base)
        for name in names:
            path = f"{base}/{posixpath.join(folder, name)}"
            stem = posixpath.splitext(path)[0]
            audio = by_stem.get(stem)
            if audio is None and layout == "hallo3":  # <subset>/audios/<id>.wav
                audio = by_stem.get(f"{posixpath.dirname(posixpath.dirname(stem))}/audios/{posixpath.basename(stem)}")
            parent = posixpath.basename(posixpath.dirname(name))
            who = identity(layout, name) if layout in LAYOUTS else parent or identity(layout, name)
            items.append(InputItem(path, dataset, audio, identity=who, split=UNMARKED))
    for path in files:
        parts = path[len(base) + 1 :].split("/")
        if not path.lower().endswith(VIDEO_EXTENSIONS) and _unsupported(path, parts, folders):
            dataset = parts[0] if len(parts) > 1 else posixpath.basename(base)
            extension = posixpath.splitext(path)[1] or "no extension"
            problem = f"unsupported_extension: {extension} is not a video, audio or sidecar extension"
            items.append(InputItem(path, dataset, identity=identity(dataset, path), split=UNMARKED, problem=problem))
    return items


def _unsupported(path: str, parts: list[str], folders: set[str]) -> bool:
    """A file no rule covers: not audio, not a sidecar, not hidden (`.DS_Store`, `.cache/`), not a
    folder (folders with files are known from the listing; only an empty one costs a lookup)."""
    known = path.lower().endswith(AUDIO_EXTENSIONS + SIDECAR_EXTENSIONS)
    if known or any(part.startswith(".") for part in parts) or path in folders:
        return False
    fs, location = storage.filesystem(path)
    return not fs.isdir(location)


def _from_list(url: str) -> list[InputItem]:
    table = _read_table(url)
    if "video" not in table.columns:
        raise ValueError(f"input list {url} needs a 'video' column (has {list(table.columns)})")
    folder = posixpath.dirname(url)
    items = []
    for row in table.to_dict("records"):
        audio = row.get("audio")
        audio = _resolve(folder, audio) if isinstance(audio, str) and audio.strip() else None
        dataset = row.get("dataset")
        dataset = dataset if isinstance(dataset, str) and dataset.strip() else "default"
        video = _resolve(folder, str(row["video"]))
        split = _text(row.get("split")).lower()
        if split not in (UNMARKED, TRAIN, HELDOUT):
            raise ValueError(f"input list {url}: split {split!r} for {video}; allowed: {TRAIN}, {HELDOUT} or empty")
        who = _text(row.get("identity")) or identity(dataset, video)
        items.append(InputItem(video, dataset, audio, identity=who, split=split))
    return items


def _read_table(url: str) -> pd.DataFrame:
    """A list's table; CSV cells stay text, so identity `007` is not the number 7."""
    data = storage.read_bytes(url)
    if url.lower().endswith(".parquet"):
        return pd.read_parquet(io.BytesIO(data))
    return pd.read_csv(io.BytesIO(data), dtype=str)


def _text(value: object) -> str:
    """A list cell as stripped text ("" when empty: pandas reads an empty cell as NaN)."""
    return str(value).strip() if isinstance(value, str) or pd.notna(value) else ""


def _resolve(folder: str, path: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    return storage.join(folder, path) if folder else path
