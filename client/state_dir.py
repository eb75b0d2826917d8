"""What an agent keeps in its state directory: its key, its identity and its status file.

`device.key` is the device's Ed25519 private key, made before the first registration
(tinyfleet.common.device_keys); it is the only secret on the device (mode 0600).
`register-sequence` is the last Register sequence number used, raised before every
registration so none can be replayed. `identity.json` holds the device id and node id
the coordinator confirmed. Every file is written atomically (temporary file, fsync,
rename) so a power cut leaves the old content or the new, never half of one.
`agent.json` tells launchers that the agent is connected (device id, node id, pid)
without them having to sleep and guess.
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
from tinyfleet.common.device_keys import DeviceKey, DeviceKeyError, next_sequence

IDENTITY_FILE = "identity.json"
STATUS_FILE = "agent.json"
KEY_FILE = "device.key"
SEQUENCE_FILE = "register-sequence"


class StateDirError(ValueError):
    """A state directory whose files cannot be used (unreadable, malformed, wrong owner)."""


@dataclass(frozen=True)
class Identity:
    """What the coordinator confirmed at registration (nothing secret: the key proves it)."""

    device_id: str
    node_id: int
    server: str
    registered_at: float


class StateDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def identity_path(self) -> Path:
        return self.path / IDENTITY_FILE

    @property
    def status_path(self) -> Path:
        return self.path / STATUS_FILE

    @property
    def key_path(self) -> Path:
        return self.path / KEY_FILE

    def device_key(self) -> DeviceKey:
        """The device's key pair, made and saved (mode 0600) the first time."""
        self.ensure()
        try:
            return DeviceKey.load_or_create(self.key_path)
        except DeviceKeyError as exc:
            raise StateDirError(str(exc)) from exc

    def next_register_sequence(self, now: float) -> int:
        """The sequence number for the next Register, stored before it is used: it never repeats,
        even without a clock or after a crash between sending and hearing back."""
        path = self.path / SEQUENCE_FILE
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = "0"
        except OSError as exc:
            raise StateDirError(f"{path}: cannot read: {exc.strerror}") from exc
        if not text.isdigit():
            raise StateDirError(f"{path}: not a sequence number; remove it to start over from the clock")
        sequence = next_sequence(int(text), now)
        self.ensure()
        write_atomically(path, f"{sequence}\n".encode(), mode=0o600)
        return sequence

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
        except ValueError as exc:
            raise StateDirError(f"{path}: not a tinyfleet identity (not valid JSON); "
                                "move it away to register this device afresh") from exc
        if not isinstance(data, dict) or "device_id" not in data or "node_id" not in data:
            raise StateDirError(f"{path}: not a tinyfleet identity (no device_id and node_id); "
                                "move it away to register this device afresh")
        try:
            return Identity(
                device_id=str(data["device_id"]),
                node_id=int(data["node_id"]),
                server=str(data.get("server", "")),
                registered_at=float(data.get("registered_at", 0.0)),
            )
        except (ValueError, TypeError) as exc:
            raise StateDirError(f"{path}: not a tinyfleet identity (node_id or registered_at is not a "
                                "number); move it away to register this device afresh") from exc

    def save_identity(self, identity: Identity) -> None:
        self.ensure()
        payload = json.dumps(asdict(identity), indent=2).encode() + b"\n"
        write_atomically(self.identity_path, payload, mode=0o600)

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
