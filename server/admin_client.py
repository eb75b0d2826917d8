"""The operator's side of the Admin service: channel (TLS with --ca), token, typed errors.

Used by `tinyfleet job ...`, `tinyfleet server devices` and `tinyfleet server enroll`.
The admin token comes from --admin-token, --admin-token-file or TINYFLEET_ADMIN_TOKEN
(`admin_token_from`) and travels as `authorization: Bearer <token>`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc

from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc

TOKEN_ENV = "TINYFLEET_ADMIN_TOKEN"


def admin_token_from(token: str | None, token_file: Path | None) -> str:
    """The admin token: given outright, else read from `token_file` (e.g. the coordinator's
    DATA_DIR/admin-token), else $TINYFLEET_ADMIN_TOKEN, else ''. Raises OSError naming the file,
    also for a file other users may read or change (as device keys are refused): such a token
    is as good as published."""
    if token:
        return token
    if token_file is not None:
        try:
            mode = stat.S_IMODE(Path(token_file).stat().st_mode)
            text = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise OSError(f"--admin-token-file {token_file}: cannot read: {exc.strerror}") from exc
        if mode & 0o077:
            raise OSError(f"--admin-token-file {token_file}: the admin token is open to other users "
                          f"(mode {mode:o}); run chmod 600 on it")
        if not text:
            raise OSError(f"--admin-token-file {token_file}: the file is empty")
        return text
    return os.environ.get(TOKEN_ENV, "")


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

    def revoke_device(self, device_id: str, reason: str = "") -> fleet_pb2.DeviceInfo:
        return self.stub.RevokeDevice(
            fleet_pb2.RevokeDeviceRequest(device_id=device_id, reason=reason),
            metadata=self.metadata, timeout=30,
        )

    def enroll(self, *, uses: int, ttl_s: float, label: str = "") -> fleet_pb2.CreateEnrollmentResponse:
        """A new enrollment token (in the answer only: the coordinator keeps its hash)."""
        return self.stub.CreateEnrollment(
            fleet_pb2.CreateEnrollmentRequest(uses=uses, ttl_s=ttl_s, label=label),
            metadata=self.metadata, timeout=30,
        )

    def enrollments(self) -> list[fleet_pb2.EnrollmentInfo]:
        response = self.stub.ListEnrollments(
            fleet_pb2.ListEnrollmentsRequest(), metadata=self.metadata, timeout=30
        )
        return list(response.enrollments)

    def revoke_enrollment(self, enrollment_id: str) -> fleet_pb2.EnrollmentInfo:
        return self.stub.RevokeEnrollment(
            fleet_pb2.RevokeEnrollmentRequest(enrollment_id=enrollment_id),
            metadata=self.metadata, timeout=30,
        )
