"""What an agent keeps in its state directory: its identity and its status file.

`identity.json` holds the device id, node id and the credential the coordinator
issued; it is the only secret on the device, so it is written with mode 0600
and atomically (temporary file, fsync, rename) so a power cut leaves either the
old identity or the new one, never half of one. `agent.json` tells launchers
that the agent is connected (device id, node id, pid) without them having to
sleep and guess.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tinyfleet.common.atomic_files import write_atomically

IDENTITY_FILE = "identity.json"
STATUS_FILE = "agent.json"
SECRET_MODE = 0o600


class StateDirError(ValueError):
    """A state directory whose files cannot be used (unreadable, malformed, wrong owner)."""


@dataclass(frozen=True)
class Identity:
    device_id: str
    node_id: int
    credential: str
    server: str
    registered_at: float

    def public(self) -> dict[str, Any]:
        """Everything but the credential: safe to print."""
        data = asdict(self)
        del data["credential"]
        return data


class StateDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def identity_path(self) -> Path:
        return self.path / IDENTITY_FILE

    @property
    def status_path(self) -> Path:
        return self.path / STATUS_FILE

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def load_identity(self) -> Identity | None:
        """The stored identity, or None before the first registration."""
        path = self.identity_path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateDirError(f"{path}: cannot read: {exc.strerror}") from exc
        try:
            data = json.loads(raw)
            return Identity(
                device_id=str(data["device_id"]),
                node_id=int(data["node_id"]),
                credential=str(data["credential"]),
                server=str(data.get("server", "")),
                registered_at=float(data.get("registered_at", 0.0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StateDirError(
                f"{path}: not a tinyfleet identity ({type(exc).__name__}: {exc}); "
                "move it away to register this device afresh"
            ) from exc

    def save_identity(self, identity: Identity) -> None:
        self.ensure()
        payload = json.dumps(asdict(identity), indent=2).encode() + b"\n"
        write_atomically(self.identity_path, payload, mode=SECRET_MODE)

    def write_status(self, *, device_id: str, node_id: int, server: str, connected: bool) -> None:
        status = {
            "device_id": device_id,
            "node_id": node_id,
            "pid": os.getpid(),
            "server": server,
            "connected": connected,
            "updated_at": time.time(),
        }
        self.ensure()
        write_atomically(self.status_path, json.dumps(status, indent=2).encode() + b"\n", mode=0o644)

    def read_status(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise StateDirError(f"{self.status_path}: malformed status file: {exc}") from exc

    def clear_status(self) -> None:
        """Called on a clean exit so no launcher mistakes a stopped agent for a live one."""
        with contextlib.suppress(FileNotFoundError):
            self.status_path.unlink()
