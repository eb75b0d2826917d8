"""Group commit of registrations: GroupRunner's grouping, and Repository.register_devices on
SQLite and PostgreSQL (one transaction per group; per-item results; a failing item retried
alone so it does not fail the others; outbox rows in call order)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest
import sqlalchemy as sa

from tinyfleet.common.device_keys import DeviceKey
from tinyfleet.server.group_runner import GroupRunner
from tinyfleet.server.repository import (
    DeviceRegistration,
    Registered,
    RegistrationRefused,
    Repository,
)

TD = "application/td+json"
OLD_KEY, OTHER_KEY, NEW_KEY = (DeviceKey.generate().public_key for _ in range(3))


def test_items_waiting_while_a_group_runs_go_together_in_the_next_and_each_gets_its_own_answer() -> None:
    release = threading.Event()
    seen: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int | Exception]:
        if not seen:
            release.wait(10)  # hold the first group until everything else has queued
        seen.append(list(items))
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    async def main() -> list[int | BaseException]:
        runner: GroupRunner[int, int] = GroupRunner(run)
        first = asyncio.ensure_future(runner.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(runner.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        release.set()
        answers = await asyncio.gather(first, *rest, return_exceptions=True)
        runner.close()
        assert (runner.groups, runner.items) == (2, 6)
        return answers

    answers = asyncio.run(main())
    assert seen == [[0], [1, 2, 3, 4, 5]]
    assert [a if isinstance(a, int) else str(a) for a in answers] == [0, "odd 1", 20, "odd 3", 40, "odd 5"]


def test_a_group_that_fails_as_a_whole_fails_each_caller_with_the_error() -> None:
    def run(items: Sequence[int]) -> list[int | Exception]:
        raise sa.exc.OperationalError("COMMIT", {}, Exception("disk I/O error"))

    async def main() -> list[BaseException | int]:
        runner: GroupRunner[int, int] = GroupRunner(run)
        answers = await asyncio.gather(*(runner.submit(i) for i in range(3)), return_exceptions=True)
        runner.close()
        return answers

    assert all(isinstance(a, sa.exc.OperationalError) for a in asyncio.run(main()))


def _item(device_id: str, node_id: int, *, key: bytes = NEW_KEY, sequence: int = 1, admin: bool = False,
          media_type: str = TD) -> DeviceRegistration:
    """A registration of a lab fleet (open enrollment): these tests are about grouping."""
    return DeviceRegistration(
        device_id=device_id, description=f'{{"id": "{device_id}", "v": {node_id}}}'.encode(),
        media_type=media_type, node_id=node_id, public_key=key, sequence=sequence, admin=admin,
        open_enrollment=True,
    )


def _commits(engine: sa.Engine) -> list[int]:
    count = [0]
    sa.event.listen(engine, "commit", lambda _conn: count.__setitem__(0, count[0] + 1))
    return count


def test_a_group_is_one_transaction_with_outbox_rows_in_call_order(engine: sa.Engine) -> None:
    repo = Repository(engine)
    repo.create_device("urn:dev:old", 500, b'{"id": "urn:dev:old"}', TD, public_key=OLD_KEY)
    start = repo.outbox_since()[-1]["seq"]
    commits = _commits(engine)
    results = repo.register_devices([
        _item("urn:dev:a", 601),
        _item("urn:dev:old", 602, key=OLD_KEY),
        _item("urn:dev:old", 603, key=OTHER_KEY),
        _item("urn:dev:b", 604),
        _item("urn:dev:a", 605, sequence=2, admin=True),  # the admin re-describes a device made just before
    ])
    assert commits[0] == 1
    assert [type(r).__name__ for r in results] == [
        "Registered", "Registered", "RegistrationRefused", "Registered", "Registered"
    ]
    created = [r.created for r in results if isinstance(r, Registered)]
    assert created == [True, False, True, False]
    assert isinstance(results[2], RegistrationRefused) and "another key" in str(results[2])
    a = repo.get_device("urn:dev:a")
    assert a is not None and a.node_id == 601 and b'"v": 605' in a.description
    old = repo.get_device("urn:dev:old")
    assert old is not None and old.node_id == 500 and b'"v": 602' in old.description
    rows = [(r["kind"], r["subject"]) for r in repo.outbox_since(start)]
    assert rows == [
        ("device.registered", "urn:dev:a"),
        ("device.updated", "urn:dev:old"),
        ("device.registered", "urn:dev:b"),
        ("device.updated", "urn:dev:a"),
    ]
    assert repo.outbox_since(start)[0]["payload"]["node_id"] == 601


def test_an_item_the_database_refuses_fails_alone_and_the_rest_of_its_group_is_stored(
    engine: sa.Engine,
) -> None:
    repo = Repository(engine)
    repo.create_device("urn:dev:taken", 700, b"{}", TD)
    start = repo.outbox_since()[-1]["seq"]
    # A node id someone else has: the group's transaction fails, nothing of it is kept, and
    # each item is retried on its own (the colliding one with a fresh node id).
    group = [_item("urn:dev:c", 701), _item("urn:dev:d", 700), _item("urn:dev:e", 702)]
    if engine.dialect.name == "postgresql":  # PostgreSQL enforces the column's length
        group.append(_item("urn:dev:f", 703, media_type="application/td+json;" + "x" * 80))
    results = repo.register_devices(group)
    assert all(isinstance(r, Registered) and r.created for r in results[:3])
    d = repo.get_device("urn:dev:d")
    assert d is not None and d.node_id not in (700, 0) and results[1].device.node_id == d.node_id  # type: ignore[union-attr]
    stored = [r["subject"] for r in repo.outbox_since(start)]
    assert stored == ["urn:dev:c", "urn:dev:d", "urn:dev:e"]
    if engine.dialect.name == "postgresql":
        assert isinstance(results[3], sa.exc.DataError)
        assert repo.get_device("urn:dev:f") is None


@pytest.mark.parametrize("size", [1, 40])
def test_groups_of_any_size_store_every_device(engine: sa.Engine, size: int) -> None:
    repo = Repository(engine)
    results = repo.register_devices([_item(f"urn:dev:n{i}", 1000 + i) for i in range(size)])
    assert [r.device.node_id for r in results] == [1000 + i for i in range(size)]  # type: ignore[union-attr]
    assert len(repo.list_devices()) == size
    assert [r["subject"] for r in repo.outbox_since()] == [f"urn:dev:n{i}" for i in range(size)]


def test_only_an_admin_re_key_of_a_revoked_device_reports_it_reinstated(engine: sa.Engine) -> None:
    """The Fleet service lifts a revocation in its hub only when `reinstated` says so."""
    repo = Repository(engine)
    first = repo.register_devices([_item("urn:dev:r", 801, key=OLD_KEY), _item("urn:dev:s", 802)])
    assert [r.reinstated for r in first] == [False, False]  # type: ignore[union-attr]
    repo.revoke_device("urn:dev:r", "lost")
    same_key, by_admin, other = repo.register_devices([
        _item("urn:dev:r", 803, key=OLD_KEY, sequence=2, admin=True),  # refused: its old key
        _item("urn:dev:r", 804, key=OTHER_KEY, sequence=3, admin=True),  # the operator re-keys it
        _item("urn:dev:s", 805, sequence=2, admin=True),  # re-described, never revoked
    ])
    assert isinstance(same_key, RegistrationRefused) and "was revoked: lost" in str(same_key)
    assert isinstance(by_admin, Registered) and by_admin.reinstated
    assert isinstance(other, Registered) and not other.reinstated
    device = repo.get_device("urn:dev:r")
    assert device is not None and device.revoked_at is None and device.public_key == OTHER_KEY


def test_the_admission_precheck_needs_a_known_unrevoked_key_or_a_usable_token(engine: sa.Engine) -> None:
    repo = Repository(engine)
    repo.register_devices([_item("urn:dev:k", 901, key=OLD_KEY)])
    repo.create_enrollment("e1", "h" * 64, label="one", uses=1, ttl_s=60)
    repo.create_enrollment("e2", "g" * 64, label="gone", uses=1, ttl_s=-1)

    def precheck(key: bytes, digest: str) -> str | None:  # one caller alone
        return repo.admission_prechecks([(key, digest)])[0][0]

    assert precheck(OLD_KEY, "") is None
    assert precheck(NEW_KEY, "h" * 64) is None
    assert "expired at" in (precheck(NEW_KEY, "g" * 64) or "")
    assert "not one this coordinator issued" in (precheck(NEW_KEY, "f" * 64) or "")
    assert "needs an enrollment token" in (precheck(NEW_KEY, "") or "")
    callers = [(OLD_KEY, ""), (NEW_KEY, "h" * 64), (NEW_KEY, "g" * 64), (NEW_KEY, "f" * 64), (b"", "")]
    alone = [precheck(key, digest) for key, digest in callers]
    together = repo.admission_prechecks(callers)  # concurrent callers, asked together
    assert [verdict for verdict, _ in together] == alone
    assert [uses for _, uses in together] == [0, 1, 1, 0, 0]  # the uses each caller's token had left
    assert [verdict is None for verdict in alone] == [True, True, False, False, False]
    repo.revoke_device("urn:dev:k", "stolen")
    assert "'urn:dev:k' was revoked: stolen" in (precheck(OLD_KEY, "") or "")
    assert repo.admission_prechecks([(OLD_KEY, "h" * 64)]) == [(None, 1)]  # a usable token still admits
    with engine.connect() as conn:  # the key lookup is indexed (migration 0004)
        assert "ix_devices_public_key" in {i["name"] for i in sa.inspect(conn).get_indexes("devices")}
