"""`make status` / `make logs` / `make stop`: the last job submitted from this checkout, or `job=<id>`.

Every submission (`make data|syncnet|encode|distill|eval` with RAY_ADDRESS set) records its job id
and cluster address in `outputs/last_job.json`; these commands read it, so a user who closed the
terminal that streamed the logs can look again, follow, or stop the job.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pipelines.ray_cluster import LAST_JOB, job_client, stream_logs

ACTIONS = ("status", "logs", "stop")


@dataclass
class JobRef:
    job_id: str
    address: str


def last_job(path: Path = LAST_JOB) -> JobRef:
    if not path.exists():
        raise FileNotFoundError(f"no job submitted from this checkout yet ({path} is missing); pass job=<id>")
    return JobRef(**json.loads(path.read_text()))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ACTIONS:
        print(f"usage: python -m pipelines.job_control {'|'.join(ACTIONS)} [job=<id>] [address=<url>]", file=sys.stderr)
        return 2
    options = dict(item.split("=", 1) for item in argv[1:] if "=" in item)
    unknown = set(options) - {"job", "address"}
    if unknown:
        print(f"unknown arguments {sorted(unknown)}; allowed: job=, address=", file=sys.stderr)
        return 2
    try:
        ref = last_job()
    except FileNotFoundError as err:
        if "job" not in options:
            print(str(err), file=sys.stderr)
            return 2
        ref = JobRef(options["job"], options.get("address", ""))
    ref = JobRef(options.get("job", ref.job_id), options.get("address", ref.address))
    client = job_client(ref.address or None)
    if argv[0] == "status":
        info = client.get_job_info(ref.job_id)
        print(f"{ref.job_id} on {ref.address}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
        return 0
    if argv[0] == "logs":
        asyncio.run(stream_logs(client, ref.job_id))
        return 0
    stopped = client.stop_job(ref.job_id)
    print(f"{ref.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
