from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tinyfleet.client import state_dir as state_dir_module
from tinyfleet.client.state_dir import Identity, StateDir, StateDirError

IDENTITY = Identity("urn:dev:pi-01", 1234, "127.0.0.1:7000", 1700000000.0)


def test_identity_round_trips_with_mode_0600(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "agent")
    assert state.load_identity() is None
    state.save_identity(IDENTITY)
    assert stat.S_IMODE(state.identity_path.stat().st_mode) == 0o600
    assert StateDir(tmp_path / "agent").load_identity() == IDENTITY  # a restart reads it back


def test_an_identity_from_before_device_keys_still_loads(tmp_path: Path) -> None:
    (tmp_path / "identity.json").write_text(
        '{"device_id": "urn:dev:pi-01", "node_id": 1234, "credential": "old", "server": "127.0.0.1:7000", '
        '"registered_at": 1700000000.0}'
    )
    assert StateDir(tmp_path).load_identity() == IDENTITY


def test_the_device_key_is_made_once_with_mode_0600_and_kept(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "agent")
    key = state.device_key()
    assert stat.S_IMODE(state.key_path.stat().st_mode) == 0o600
    assert StateDir(tmp_path / "agent").device_key().public_key == key.public_key  # a restart: same key
    os.chmod(state.key_path, 0o644)
    with pytest.raises(StateDirError, match="readable by others"):
        state.device_key()
    os.chmod(state.key_path, 0o600)
    state.key_path.write_text("not a key")
    with pytest.raises(StateDirError, match="not a PEM private key"):
        state.device_key()


def test_register_sequence_numbers_only_go_up_and_survive_restarts(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    first = state.next_register_sequence(now=1_700_000_000.0)
    assert first == 1_700_000_000_000  # the clock in milliseconds, when it is ahead
    assert StateDir(tmp_path).next_register_sequence(now=1_700_000_000.0) == first + 1
    assert state.next_register_sequence(now=5.0) == first + 2  # a device without a clock counts on
    (tmp_path / "register-sequence").write_text("garbage")
    with pytest.raises(StateDirError, match="not a sequence number"):
        state.next_register_sequence(now=0.0)


def test_rewrite_keeps_0600_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.save_identity(IDENTITY)
    os.chmod(state.identity_path, 0o644)  # someone loosened it; the next write tightens it again
    updated = Identity(**{**IDENTITY.__dict__, "node_id": 4321})
    state.save_identity(updated)
    assert state.load_identity() == updated
    assert stat.S_IMODE(state.identity_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.json"]


def test_a_failed_write_leaves_the_old_identity_intact(tmp_path: Path, monkeypatch) -> None:
    state = StateDir(tmp_path)
    state.save_identity(IDENTITY)

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(state_dir_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        state.save_identity(Identity(**{**IDENTITY.__dict__, "node_id": 1}))
    monkeypatch.undo()
    assert state.load_identity() == IDENTITY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.json"]


@pytest.mark.parametrize("content", ["{not json", '{"device_id": "x"}', "[]"])
def test_malformed_identity_is_named(tmp_path: Path, content: str) -> None:
    (tmp_path / "identity.json").write_text(content)
    with pytest.raises(StateDirError, match=r"identity\.json: not a tinyfleet identity"):
        StateDir(tmp_path).load_identity()


def test_status_file_lifecycle(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    assert state.read_status() is None
    state.write_status(device_id="urn:dev:a", node_id=7, server="h:1", connected=True)
    status = state.read_status()
    assert status is not None
    assert (status["device_id"], status["node_id"], status["pid"], status["connected"]) == (
        "urn:dev:a", 7, os.getpid(), True
    )
    state.clear_status()
    assert state.read_status() is None
