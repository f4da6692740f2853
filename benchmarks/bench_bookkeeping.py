"""The data job driver's bookkeeping at scale: 10,000 committed tasks on S3 (moto on 127.0.0.1).

Before a run the driver must learn which tasks are done, and after it rebuild the tables from every
task's commit marker. Before: one existence check and one read per task, one request at a time.
Now: one listing of `stats/` and the markers read concurrently (`data_jobs.job.read_markers`,
s3fs batching the GETs), then the planning that decides what still runs.

moto answers from memory, so each request costs only CPU; a real endpoint adds a network round
trip per request, which is what serial bookkeeping pays 2 x tasks times. The second measurement
puts a proxy in front of moto that holds every request for `--rtt-ms` (labelled as simulated).

    python -m benchmarks.bench_bookkeeping [--tasks 10000] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time

from benchmarks.results import machine, report, s3_server

HEADING = "## Data job bookkeeping"
COMMAND = "python -m benchmarks.bench_bookkeeping --write"


def marker(index: int) -> dict:
    """A committed task of 4 inputs and 8 samples, shaped like the job's markers (about 4 KB)."""
    inputs = [f"s3://bench/raw/id{index:05d}/clip{k}.mp4" for k in range(4)]
    samples = [{"key": f"clip{k}-{index:08x}-{k * 125:06d}", "shard": f"lipforcing-{index:012x}-00", "source": inputs[k % 4],
                "dataset": "voxceleb2", "identity": f"id{index:05d}", "split": "train", "start_s": 5.0 * k, "end_s": 5.0 * k + 5,
                "num_frames": 125, "fps": 25.0, "width": 512, "height": 512, "sync_conf": None, "av_offset": None, "iqa": 61.2}
               for k in range(8)]  # fmt: skip
    return {"task": f"lipforcing-{index:012x}", "config_hash": "c0ffee", "inputs": inputs, "samples": samples, "rejects": [],
            "shards": [{"name": f"lipforcing-{index:012x}-00", "split": "train", "samples": 8, "bytes": 1 << 24,
                        "keys": [s["key"] for s in samples]}],
            "timings_s": {"probe": 0.1, "faces": 3.0}, "clip_seconds_in": 40.0, "clip_seconds_out": 40.0}  # fmt: skip


def plant(stats: str, count: int) -> list[dict]:
    from lipforcing import storage

    fs, root = storage.filesystem(stats)
    markers = [marker(i) for i in range(count)]
    fs.pipe({f"{root}/{m['task']}.json": json.dumps(m).encode() for m in markers})  # concurrent PUTs
    return markers


def before(stats: str, markers: list[dict]) -> int:
    """The old driver: per planned task, does its marker exist, then read it; serially."""
    from lipforcing import storage

    found = 0
    for m in markers:
        url = storage.join(stats, f"{m['task']}.json")
        if storage.exists(url):
            found += len(json.loads(storage.read_text(url))["inputs"])
    return found


def after(stats: str, markers: list[dict]) -> int:
    """The driver now: one listing, concurrent reads, then what to keep and what to plan."""
    from data_jobs.config import DataJobConfig
    from data_jobs.inputs import InputItem
    from data_jobs.job import kept_markers, plan_tasks, read_markers

    items = [InputItem(video, "voxceleb2") for m in markers for video in m["inputs"]]
    kept = kept_markers(read_markers(stats), items, "c0ffee", "s3://bench")
    assert not plan_tasks(DataJobConfig(), items, {v for s in kept.values() for v in s["inputs"]})
    return sum(len(s["inputs"]) for s in kept.values())


def delaying_proxy(upstream: str, delay_s: float) -> str:
    """An endpoint that forwards to `upstream` (http://host:port), holding each request `delay_s`:
    a stand-in for the network round trip to a remote object store."""
    host, port = upstream.removeprefix("http://").split(":")
    loop = asyncio.new_event_loop()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        try:
            while chunk := await reader.read(1 << 16):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()

    async def connect(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(client_reader, server_writer, delay_s), pipe(server_reader, client_writer, 0.0),
                             return_exceptions=True)  # fmt: skip

    server = loop.run_until_complete(asyncio.start_server(connect, "127.0.0.1", 0))
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def timed(stats: str, markers: list[dict]) -> dict[str, float]:
    from lipforcing import storage

    results = {}
    for name, driver in (("before", before), ("after", after)):
        storage.filesystem(stats)[0].invalidate_cache()  # no listing cached from planting or the other run
        started = time.perf_counter()
        assert driver(stats, markers) == 4 * len(markers)
        results[name] = time.perf_counter() - started
    return results


def measure(tasks: int, rtt_ms: float) -> dict[str, dict[str, float]]:
    import logging

    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    bucket, env = s3_server()
    os.environ.update(env)
    stats = f"{bucket}/book/stats"
    started = time.perf_counter()
    markers = plant(stats, tasks)
    results = {"moto": {**timed(stats, markers), "planted_s": time.perf_counter() - started}}
    os.environ["AWS_ENDPOINT_URL"] = delaying_proxy(env["AWS_ENDPOINT_URL"], rtt_ms / 1000)
    s3fs.S3FileSystem.clear_instance_cache()  # the next client connects through the proxy
    results[f"moto + {rtt_ms:.0f} ms simulated round trip"] = timed(stats, markers)
    return results


def markdown(tasks: int, rtt_ms: float, results: dict[str, dict[str, float]]) -> str:
    lines = [
        HEADING,
        "",
        f"Machine: {machine()}. Command: `{COMMAND}`. {tasks:,} committed task markers (about 4 KB each, "
        f"4 inputs and 8 samples per task) on a moto S3 server on 127.0.0.1 (planted in {results['moto']['planted_s']:.0f} s). "
        "One run each, side by side. moto answers from memory on the same 2 shared cores, so there each "
        "request costs CPU only; the second endpoint is the same server behind a proxy that holds every "
        f"request {rtt_ms:.0f} ms, a simulated network round trip (not a measured S3).",
        "",
        "| endpoint | before: exists + read per task, serially (s) | now: one listing, concurrent reads, keep + plan (s) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for endpoint, row in results.items():
        lines.append(f"| {endpoint} | {row['before']:.1f} | {row['after']:.1f} | {row['before'] / row['after']:.1f}x |")
    slow = results[f"moto + {rtt_ms:.0f} ms simulated round trip"]
    lines += [
        "",
        f"At VoxCeleb2 scale (~270k tasks of 4 clips) with the simulated round trip that is about "
        f"{slow['before'] * 270_000 / tasks / 3600:.1f} h before vs {slow['after'] * 270_000 / tasks / 60:.0f} min now, "
        "per pass (scaled linearly from this run).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rtt-ms", type=float, default=10.0, help="the simulated round trip of the second endpoint")
    parser.add_argument("--write", action="store_true", help=f"put the section into benchmarks/RESULTS.md ({HEADING})")
    args = parser.parse_args(argv)
    return report(markdown(args.tasks, args.rtt_ms, measure(args.tasks, args.rtt_ms)), HEADING, args.write)


if __name__ == "__main__":
    main()
