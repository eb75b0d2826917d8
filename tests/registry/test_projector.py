"""Outbox projection: SQL is the system of record; the store catches up and can be rebuilt."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tinyfleet.server.database import default_url, open_database
from tinyfleet.server.registry.projector import Projector, rebuild
from tinyfleet.server.registry.store import EmbeddedStore
from tinyfleet.server.registry.thing_graphs import Registry
from tinyfleet.server.registry.validation import ShaclValidator
from tinyfleet.server.repository import Repository

TD_JSON = "application/td+json"


def _repository(tmp_path: Path) -> Repository:
    return Repository(open_database(default_url(tmp_path)))


def test_projection_catches_up_after_a_crash_between_commit_and_projection(
    tmp_path: Path, make_td: Callable[..., bytes]
) -> None:
    repo = _repository(tmp_path)
    store_dir = tmp_path / "registry"
    registry = Registry(EmbeddedStore(store_dir))
    projector = Projector(registry, repo, batch=2)
    repo.create_device("urn:tinyfleet:device:a", 11, make_td("a"), TD_JSON)
    assert projector.catch_up().descriptions == 1
    # Changes committed to SQL while the registry is down ("killed" before projecting them).
    registry.store.close()
    repo.create_device("urn:tinyfleet:device:b", 12, make_td("b", sensors=("Camera",)), TD_JSON)
    repo.set_online("urn:tinyfleet:device:b", True)
    repo.replace_description("urn:tinyfleet:device:a", make_td("a", ram_kb=64), TD_JSON)
    repo.create_device("urn:tinyfleet:device:c", 13, b'{"not": "a td"}', TD_JSON)
    restarted = Registry(EmbeddedStore(store_dir))
    assert restarted.last_applied_seq() == 1
    done = Projector(restarted, repo, batch=2).catch_up()
    assert (done.rows, done.descriptions, done.liveness, done.skipped) == (4, 2, 1, 1)
    assert restarted.last_applied_seq() == 5
    rows = {r["device"].value: r for r in restarted.named("devices")}
    assert set(rows) == {"urn:tinyfleet:device:a", "urn:tinyfleet:device:b"}
    assert rows["urn:tinyfleet:device:a"]["ramKB"].value == "64"
    assert rows["urn:tinyfleet:device:b"]["online"].value == "true"
    assert restarted.eligible("eligible-devices sensors=sosa_extend:Camera") == ["urn:tinyfleet:device:b"]
    # Nothing new: catching up again applies nothing and changes nothing.
    assert Projector(restarted, repo).catch_up().rows == 0


def test_rebuild_regenerates_the_store_from_sql(tmp_path: Path, make_td: Callable[..., bytes]) -> None:
    repo = _repository(tmp_path)
    for i in range(3):
        repo.create_device(f"urn:tinyfleet:device:d{i}", 20 + i, make_td(f"d{i}"), TD_JSON)
    repo.set_online("urn:tinyfleet:device:d1", True)
    fresh = Registry(EmbeddedStore(None))
    seen: list[tuple[int, int]] = []
    applied = rebuild(fresh, repo, progress=lambda done, total: seen.append((done, total)))
    assert (applied.descriptions, applied.skipped) == (3, 0)
    assert fresh.last_applied_seq() == 4
    assert seen[-1] == (3, 3)
    online = {
        r["device"].value for r in fresh.named("devices") if r["online"] and r["online"].value == "true"
    }
    assert online == {"urn:tinyfleet:device:d1"}


def test_last_seen_is_mirrored_in_batches(tmp_path: Path, make_td: Callable[..., bytes]) -> None:
    from tinyfleet.server.registry.projector import LivenessMirror

    repo = _repository(tmp_path)
    registry = Registry(EmbeddedStore(None))
    for name in ("a", "b"):
        repo.create_device(
            f"urn:tinyfleet:device:{name}", hash(name) % 1000, make_td(name), TD_JSON
        )
    Projector(registry, repo).catch_up()
    mirror = LivenessMirror(registry, repo)
    assert mirror.sync() == 2  # first pass: every projected device
    assert mirror.sync() == 0  # nothing changed
    repo.touch_last_seen({"urn:tinyfleet:device:a": 1_800_000_000.0})
    assert mirror.sync() == 1
    [row] = [r for r in registry.named("devices") if r["device"].value == "urn:tinyfleet:device:a"]
    assert row["lastSeen"].value.startswith("2027-01-15T08:00:00")


def test_a_device_described_twice_in_one_batch_gets_its_last_description(
    tmp_path: Path, make_td: Callable[..., bytes]
) -> None:
    repo = _repository(tmp_path)
    registry = Registry(EmbeddedStore(None), validator=ShaclValidator())  # nothing validated before
    repo.create_device("urn:tinyfleet:device:a", 11, make_td("a", ram_kb=128), TD_JSON)
    repo.replace_description("urn:tinyfleet:device:a", make_td("a", ram_kb=64), TD_JSON)
    repo.create_device("urn:tinyfleet:device:b", 12, make_td("b"), TD_JSON)
    done = Projector(registry, repo).catch_up()  # one batch
    assert (done.rows, done.descriptions, done.skipped) == (3, 2, 0)
    rows = {r["device"].value: r["ramKB"].value for r in registry.named("devices")}
    assert rows == {"urn:tinyfleet:device:a": "64", "urn:tinyfleet:device:b": "512"}
