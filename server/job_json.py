"""How a job looks from outside: one dict shape for the Admin API, the HTTP API and the CLI.

Round rows carry what operators and the round-latency benchmark read: participants,
drops (with each node's status and reason), metrics, bytes, the round's duration
and its train/evaluate parts, and each node's compute seconds.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from tinyfleet.protos.tinyfleet.v1 import fleet_pb2
from tinyfleet.server.repository import Device, Job, Repository, RoundRecord


def round_dict(record: RoundRecord) -> dict[str, Any]:
    data = asdict(record)
    data["nodes"] = [asdict(n) for n in record.nodes]
    return data


def job_dict(job: Job, rounds: list[RoundRecord]) -> dict[str, Any]:
    return {
        "job_id": str(job.id),
        "name": job.name,
        "strategy": job.strategy,
        "state": job.state,
        "reason": job.reason,
        "rounds_total": job.rounds_total,
        "rounds_done": job.rounds_done,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "rounds": [round_dict(r) for r in rounds],
    }


class RoundsFollower:
    """A watcher's view of one job's rounds: each finished round is read and encoded once.

    Rounds never change once recorded, so following a long job costs only the new
    rounds at each change instead of re-reading and re-encoding its whole history.
    """

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self._encoded: list[str] = []
        self._last_round = 0

    def job_info(self, repo: Repository) -> fleet_pb2.JobInfo | None:
        job = repo.get_job(self.job_id)
        if job is None:
            return None
        for record in repo.get_rounds(self.job_id, after_round=self._last_round):
            self._encoded.append(json.dumps(round_dict(record)))
            self._last_round = record.round
        return job_info(job, rounds_json="[" + ", ".join(self._encoded) + "]")


def job_info(
    job: Job, rounds: list[RoundRecord] | None = None, *, rounds_json: str | None = None
) -> fleet_pb2.JobInfo:
    """The Admin API's JobInfo; `rounds_json` (already encoded rounds) wins over `rounds`."""
    if rounds_json is None:
        rounds_json = json.dumps([round_dict(r) for r in rounds or []])
    return fleet_pb2.JobInfo(
        job_id=str(job.id),
        name=job.name,
        state=job.state,
        reason=job.reason,
        rounds_total=job.rounds_total,
        rounds_done=job.rounds_done,
        created_at=job.created_at,
        finished_at=job.finished_at or 0.0,
        rounds_json=rounds_json,
        strategy=job.strategy,
    )


def job_info_dict(info: fleet_pb2.JobInfo) -> dict[str, Any]:
    """The CLI's view of a JobInfo (the same keys as `job_dict`)."""
    return {
        "job_id": info.job_id,
        "name": info.name,
        "strategy": info.strategy,
        "state": info.state,
        "reason": info.reason,
        "rounds_total": info.rounds_total,
        "rounds_done": info.rounds_done,
        "created_at": info.created_at,
        "finished_at": info.finished_at or None,
        "rounds": json.loads(info.rounds_json or "[]"),
    }


def device_dict(device: Device, connected: bool) -> dict[str, Any]:
    return {
        "device_id": device.device_id,
        "node_id": device.node_id,
        "online": connected,
        "last_seen": device.last_seen,
        "registered_at": device.registered_at,
        "media_type": device.media_type,
        "agent_version": device.agent_version,
    }
