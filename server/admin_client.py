"""The operator's side of the Admin service: channel (TLS with --ca), token, typed errors.

Used by `tinyfleet job ...` and `tinyfleet server devices`. The admin token comes
from --admin-token or TINYFLEET_ADMIN_TOKEN and travels as
`authorization: Bearer <token>`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc

from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc

TOKEN_ENV = "TINYFLEET_ADMIN_TOKEN"
SERVER_ENV = "TINYFLEET_SERVER"


class AdminClient:
    def __init__(
        self, server: str, *, admin_token: str | None = None, ca: Path | None = None
    ) -> None:
        if ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
            self.channel = grpc.secure_channel(server, credentials)
        else:
            self.channel = grpc.insecure_channel(server)
        self.stub = fleet_pb2_grpc.AdminStub(self.channel)
        token = admin_token or os.environ.get(TOKEN_ENV, "")
        self.metadata = [("authorization", f"Bearer {token}")] if token else []

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def submit(self, spec_toml: str) -> fleet_pb2.JobInfo:
        return self.stub.SubmitJob(
            fleet_pb2.SubmitJobRequest(spec_toml=spec_toml), metadata=self.metadata, timeout=30
        )

    def job(self, job_id: str) -> fleet_pb2.JobInfo:
        return self.stub.GetJob(
            fleet_pb2.GetJobRequest(job_id=job_id), metadata=self.metadata, timeout=30
        )

    def jobs(self) -> list[fleet_pb2.JobInfo]:
        response = self.stub.ListJobs(fleet_pb2.ListJobsRequest(), metadata=self.metadata, timeout=30)
        return list(response.jobs)

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[fleet_pb2.JobInfo]:
        """Every state change of the job until it ends (a server stream; no polling)."""
        yield from self.stub.WatchJob(
            fleet_pb2.GetJobRequest(job_id=job_id), metadata=self.metadata, timeout=timeout
        )

    def devices(self) -> list[fleet_pb2.DeviceInfo]:
        response = self.stub.ListDevices(
            fleet_pb2.ListDevicesRequest(), metadata=self.metadata, timeout=30
        )
        return list(response.devices)
