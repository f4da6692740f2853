"""Rows of the dataset's tables, and the tables rebuilt from committed per-task stats.

`manifest.parquet` (one row per written sample) and `rejects.parquet` (one row per rejected input
or segment) are derived data: the job rewrites them from `stats/*.json` at the end of every run,
so a rerun or a resumed run never duplicates a row. Rows carry the input's `identity` and `split`
(`train` / `heldout`, see `data_jobs/inputs.py`): the held-out set has tables of its own.
"""

from __future__ import annotations

import io
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_jobs.pipeline import Reject, Sample
from lipforcing import storage

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("source", pa.string()),
        ("dataset", pa.string()),
        ("identity", pa.string()),
        ("split", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("num_frames", pa.int64()),
        ("fps", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("sync_conf", pa.float64()),
        ("av_offset", pa.int64()),
        ("iqa", pa.float64()),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("dataset", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("identity", pa.string()),
        ("split", pa.string()),
    ]
)


def manifest_row(metadata: dict[str, Any], shard: str) -> dict[str, Any]:
    """A written sample's row, taken from its JSON member."""
    return {name: shard if name == "shard" else metadata.get(name) for name in MANIFEST_SCHEMA.names}


def reject_row(sample: Sample, reject: Reject) -> dict[str, Any]:
    return {
        "source": sample.source,
        "dataset": sample.dataset,
        "stage": reject.stage,
        "reason": reject.reason,
        "detail": reject.detail,
        "start_s": reject.start_s,
        "end_s": reject.end_s,
        "identity": sample.identity,
        "split": sample.split,
    }


def write_table(rows: list[dict[str, Any]], schema: pa.Schema, url: str, sort_by: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=schema.names)
    if len(frame):
        frame = frame.sort_values(sort_by, kind="stable").reset_index(drop=True)
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(url, buffer.getvalue())
    return frame


def read_table(url: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(storage.read_bytes(url)))
