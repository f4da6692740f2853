"""The real talking-head clips of `../shared/data/real` as a data-job input list (never committed:
benchmarks read them where they lie and stop with a clear message when they are absent)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def write_real_list(path: Path, folder: Path = REAL, leave_out: Iterable[str] = ()) -> int:
    """A list file of every real mp4 (less `leave_out` names), each with its separate wav when it
    has one, tagged by its source project; returns how many clips it lists."""
    if not folder.is_dir():
        raise SystemExit(f"the real clips are not at {folder}: this benchmark measures on them")
    skipped = set(leave_out)
    rows = ["video,audio,dataset"]
    for video in sorted(folder.glob("*.mp4")):
        if video.name not in skipped:
            wav = video.with_suffix(".wav")
            rows.append(f"{video},{wav if wav.exists() else ''},{video.stem.split('_')[0]}")
    path.write_text("\n".join(rows) + "\n")
    return len(rows) - 1
