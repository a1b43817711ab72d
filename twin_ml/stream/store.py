"""Live twins' persistence: one table of twins on SQLAlchemy 2.x (torch-free).

    store = TwinStore("sqlite:////var/lib/twin-ml/twins.sqlite")   # or postgresql+psycopg://...
    rec = store.create("pump-7", "tanks:v1", twin.state())          # version 1
    rec = store.get("pump-7")
    rec = store.save("pump-7", new_state, rec.version, last_seq=42)  # version 2, or StaleVersion

A row per twin: `id`, `model` (the served model's NAME:VERSION), `created` / `updated` (UTC),
`version` (1 at creation, +1 per save), `state` (`Twin.state()` as JSON text: Python's JSON writes
each float's shortest repr, which reads back bit for bit) and `last_seq` (the last message
sequence a stream consumer assimilated, or null; it skips redelivered messages below it).

Guarantees:
- Every write is one transaction: a crash (SIGKILL, power loss with SQLite's synchronous=FULL)
  leaves a twin's old row or its new one, never a mix, and never a half-written state.
- `save` is a compare-and-set on `version` (`UPDATE ... WHERE id = ? AND version = ?`): a writer
  whose read is no longer the latest gets `StaleVersion` and nothing is written, so an update is
  never lost, whichever process or thread wrote in between. Re-read, redo, save again.
- `create` with a `limit` counts and inserts in one transaction (on SQLite a write transaction,
  BEGIN IMMEDIATE, so two processes cannot both take the last place; on PostgreSQL under read
  committed, concurrent creates may pass a limit by their number).
Only portable column types (strings, integers, timestamps, text): the same code runs on SQLite
(the default; WAL mode, so readers never wait for a writer) and PostgreSQL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SQLITE_BUSY_S = 30.0  # how long a writer waits for another process's write transaction

metadata = MetaData()
twins = Table(
    "twin_ml_twins",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("model", String(256), nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("last_seq", BigInteger, nullable=True),
)


class StoreError(Exception):
    """A twin store operation that cannot be done; the message says why."""


class TwinNotFound(StoreError, KeyError):
    def __init__(self, twin_id: str):
        super().__init__(f"no twin {twin_id!r} in the store")
        self.twin_id = twin_id

    def __str__(self) -> str:  # KeyError's own str() quotes the message
        return self.args[0]


class TwinExists(StoreError):
    def __init__(self, twin_id: str):
        super().__init__(f"a twin {twin_id!r} exists already (delete it first, or pick another id)")
        self.twin_id = twin_id


class StaleVersion(StoreError):
    """The twin was saved by another writer since it was read (`found` is its version now)."""

    def __init__(self, twin_id: str, expected: int, found: int):
        super().__init__(
            f"twin {twin_id!r} is at version {found}, not {expected}: another writer saved it "
            "since it was read (re-read it and try again)"
        )
        self.twin_id, self.expected, self.found = twin_id, expected, found


class StoreFull(StoreError):
    def __init__(self, limit: int):
        super().__init__(
            f"the store holds its limit of {limit} twins: delete one before creating another"
        )
        self.limit = limit


@dataclass(frozen=True)
class TwinRecord:
    id: str
    model: str
    created: datetime
    updated: datetime
    version: int
    state: dict[str, Any] | None  # None: listed without it
    last_seq: int | None

    def summary(self) -> dict[str, Any]:
        """The row without its state, as JSON values."""
        return {
            "id": self.id,
            "model": self.model,
            "created": self.created.isoformat(),
            "updated": self.updated.isoformat(),
            "version": self.version,
            "last_seq": self.last_seq,
        }


def check_id(twin_id: Any, where: str = "id") -> str:
    """A twin id: 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not isinstance(twin_id, str) or not ID_PATTERN.match(twin_id):
        raise ValueError(
            f"{where}: {twin_id!r} is not a twin id (1 to 128 of A-Z a-z 0-9 . _ -, starting "
            "with a letter or digit)"
        )
    return twin_id


def sqlite_url(path: str | Path) -> str:
    """The store URL of a SQLite file."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def _utc(t: datetime) -> datetime:
    """SQLite gives timestamps back without their zone: they were written in UTC."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _record(row, with_state: bool = True) -> TwinRecord:
    m = row._mapping
    return TwinRecord(
        id=m["id"],
        model=m["model"],
        created=_utc(m["created"]),
        updated=_utc(m["updated"]),
        version=int(m["version"]),
        state=json.loads(m["state"]) if with_state else None,
        last_seq=None if m["last_seq"] is None else int(m["last_seq"]),
    )


def _dumps(state: dict[str, Any]) -> str:
    if not isinstance(state, dict):
        raise TypeError(f"a twin's state is a JSON object, got {type(state).__name__}")
    return json.dumps(state, separators=(",", ":"))


class TwinStore:
    """The twins' table at `url` (a SQLAlchemy URL; a SQLite file's folder is made if missing).
    Safe to share between threads; several processes may open the same store."""

    def __init__(self, url: str, *, create: bool = True):
        self.url = make_url(url)
        self.sqlite = self.url.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {}
        if self.sqlite:
            db = self.url.database
            if not db or db == ":memory:":
                raise ValueError(
                    f"{url}: an in-memory SQLite store forgets every twin; give a file "
                    "(sqlite:////abs/path/twins.sqlite)"
                )
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_S, "check_same_thread": False}
        self.engine: Engine = create_engine(self.url, pool_pre_ping=not self.sqlite, **kwargs)
        if self.sqlite:
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        if create:
            self._create_table()

    def _create_table(self) -> None:
        for attempt in range(3):  # another process may create it at the same moment
            try:
                with self._write() as conn:
                    metadata.create_all(conn, checkfirst=True)
                return
            except (OperationalError, IntegrityError):
                if attempt == 2:
                    raise

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction (SQLite: BEGIN IMMEDIATE, the write lock taken at its start, so
        what it reads stays true until it commits)."""
        with self.engine.connect() as conn:
            conn.execution_options(twin_ml_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # ---- the operations ------------------------------------------------------------------------
    def create(
        self,
        twin_id: str,
        model: str,
        state: dict[str, Any],
        *,
        last_seq: int | None = None,
        limit: int | None = None,
    ) -> TwinRecord:
        """A new twin at version 1; `TwinExists` if the id is taken, `StoreFull` when the store
        holds `limit` twins already."""
        check_id(twin_id)
        text = _dumps(state)
        now = datetime.now(UTC)
        try:
            with self._write() as conn:
                if limit is not None:
                    held = conn.execute(select(func.count()).select_from(twins)).scalar_one()
                    if held >= limit:
                        raise StoreFull(limit)
                conn.execute(
                    insert(twins).values(
                        id=twin_id,
                        model=model,
                        created=now,
                        updated=now,
                        version=1,
                        state=text,
                        last_seq=last_seq,
                    )
                )
        except IntegrityError:
            raise TwinExists(twin_id) from None
        return TwinRecord(twin_id, model, now, now, 1, json.loads(text), last_seq)

    def get(self, twin_id: str) -> TwinRecord:
        with self._read() as conn:
            row = conn.execute(select(twins).where(twins.c.id == twin_id)).first()
        if row is None:
            raise TwinNotFound(twin_id)
        return _record(row)

    def save(
        self,
        twin_id: str,
        state: dict[str, Any],
        version: int,
        *,
        last_seq: int | None = None,
    ) -> TwinRecord:
        """Replace the twin's state if it is still at `version` (the one read): version + 1, in
        one transaction. `last_seq` None keeps the stored one. `StaleVersion` if another writer
        saved it since (nothing written), `TwinNotFound` if it is gone."""
        text = _dumps(state)
        now = datetime.now(UTC)
        values: dict[str, Any] = {"state": text, "version": version + 1, "updated": now}
        if last_seq is not None:
            values["last_seq"] = last_seq
        with self._write() as conn:
            done = conn.execute(
                update(twins)
                .where(twins.c.id == twin_id, twins.c.version == version)
                .values(**values)
            ).rowcount
            if done != 1:
                found = conn.execute(
                    select(twins.c.version).where(twins.c.id == twin_id)
                ).scalar_one_or_none()
                if found is None:
                    raise TwinNotFound(twin_id)
                raise StaleVersion(twin_id, version, int(found))
            row = conn.execute(select(twins).where(twins.c.id == twin_id)).one()
        return _record(row)

    def delete(self, twin_id: str, version: int | None = None) -> None:
        """Remove the twin (`version`: only if still at it, else `StaleVersion`)."""
        with self._write() as conn:
            query = delete(twins).where(twins.c.id == twin_id)
            if version is not None:
                query = query.where(twins.c.version == version)
            if conn.execute(query).rowcount != 1:
                found = conn.execute(
                    select(twins.c.version).where(twins.c.id == twin_id)
                ).scalar_one_or_none()
                if found is None:
                    raise TwinNotFound(twin_id)
                raise StaleVersion(twin_id, int(version or 0), int(found))

    def list(self, model: str | None = None) -> list[TwinRecord]:
        """Every twin (of `model`, if given), by id, without their states."""
        cols = [c for c in twins.c if c.name != "state"]
        query = select(*cols).order_by(twins.c.id)
        if model is not None:
            query = query.where(twins.c.model == model)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [_record(r, with_state=False) for r in rows]

    def count(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.count()).select_from(twins)).scalar_one())


def _sqlite_connect(dbapi_conn, _record) -> None:
    # SQLAlchemy emits BEGIN itself (`_sqlite_begin`): sqlite3's legacy mode would begin only at
    # the first write, so a transaction's reads would not be isolated
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        cur.execute("PRAGMA synchronous=FULL")  # a commit survives power loss too
    finally:
        cur.close()


def _sqlite_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("twin_ml_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")
