"""Conversations and messages on disk: one SQLite file under the user data dir.

- The schema version is SQLite's `user_version`; `MIGRATIONS[i]` takes a database from version i
  to i + 1, each in one transaction, so a failed migration leaves the file as it was.
- WAL mode, and every write is its own committed transaction: a user message is saved when it is
  sent, a reply when it starts (finish_reason "streaming") and then as it streams, so killing the app
  mid-reply loses no earlier message and at most the last second of the reply; the next start marks
  such a reply "interrupted" (`mark_interrupted`).
- Only corruption moves a file aside: SQLite's `quick_check` failing, or "file is not a database". It is
  renamed (never overwritten) and a fresh one is started; `open_store` returns a notice saying where it went.
  Everything else leaves the file as it is: a lock held by another program is retried for BUSY_TIMEOUT_S
  and then reported; a read-only file is opened read-only (its conversations are shown, nothing is saved);
  a full disk, a missing table or a newer schema are reported. Every failure is a one-line StoreError, and
  a database that could not be created is removed again (never a 0-byte file left behind).
- Used from the UI thread only; every call is a few milliseconds (a locked database: up to BUSY_TIMEOUT_S).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DB_FILE = "chattui.db"
BUSY_TIMEOUT_S = 2.0  # how long a write waits for another program's lock before saying so
TABLES = ("conversations", "messages", "recent_models", "jobs")  # what the latest schema has

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: conversations, their messages, recently used models.
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL DEFAULT '',
        mode TEXT NOT NULL DEFAULT 'chat',          -- 'chat' (template) or 'generate' (raw completion)
        settings TEXT NOT NULL DEFAULT '{}',        -- JSON: system_prompt and sampling overrides
        model TEXT,                                 -- folder of the model last used here
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        role TEXT NOT NULL,                         -- 'user' or 'assistant'
        content TEXT NOT NULL,
        created_at REAL NOT NULL,
        finished_at REAL,
        finish_reason TEXT,                         -- eos, stop, length, cancelled, error (replies)
        prompt_tokens INTEGER,
        generated_tokens INTEGER,
        stats TEXT NOT NULL DEFAULT '{}',           -- JSON: ttft_s, decode_tokens_per_s, seed, ...
        settings TEXT NOT NULL DEFAULT '{}',        -- JSON: the sampling settings used
        model TEXT,                                 -- folder of the model that wrote the reply
        UNIQUE (conversation_id, position)
    );
    CREATE INDEX messages_by_conversation ON messages (conversation_id, position);
    CREATE TABLE recent_models (
        path TEXT PRIMARY KEY,
        last_used REAL NOT NULL
    );
    """,
    # 1 -> 2: fine-tune jobs (their folders hold the rest: chattui.jobs).
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,                        -- the job id (its folder's name by default)
        name TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'queued',      -- queued, running, done, failed, cancelled
        out_dir TEXT NOT NULL,                      -- the job folder
        base_model TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 2 -> 3: the adapter a conversation and each reply used; the mode each message was written in.
    """
    ALTER TABLE conversations ADD COLUMN adapter TEXT;        -- LoRA adapter folder on top of model, if any
    ALTER TABLE messages ADD COLUMN adapter TEXT;             -- the adapter that wrote the reply, if any
    ALTER TABLE messages ADD COLUMN mode TEXT NOT NULL DEFAULT 'chat';  -- 'chat' or 'generate' (raw)
    """,
)


class StoreError(Exception):
    """The database cannot be used (e.g. written by a newer chattui); the message says why."""


class CorruptDatabase(StoreError):
    """The file is not a readable SQLite database."""


class ReadOnlyDatabase(StoreError):
    """The file (or its folder) cannot be written."""


# SQLite's primary result codes (https://sqlite.org/rescode.html) that say what went wrong.
_BUSY, _LOCKED, _READONLY, _CORRUPT, _FULL, _NOTADB = 5, 6, 8, 11, 13, 26


def _store_error(e: sqlite3.Error, path: Path | None) -> StoreError:
    """One line for the user, of the StoreError kind that says what can be done about it."""
    code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
    where = path or "the in-memory database"
    if code in (_CORRUPT, _NOTADB):
        return CorruptDatabase(str(e))
    if code in (_BUSY, _LOCKED):
        return StoreError(f"{where} is locked by another program (another chattui?); not saved, try again")
    if code == _READONLY:
        return ReadOnlyDatabase(f"{where} is read-only; not saved")
    if code == _FULL:
        return StoreError(f"not saved: the disk holding {where} is full")
    return StoreError(f"{where}: {e}")


@dataclass
class Conversation:
    id: int
    title: str
    mode: str  # "chat" or "generate"
    settings: dict[str, Any]  # system_prompt and sampling overrides (absent = model default)
    model: str | None
    created_at: float
    updated_at: float
    adapter: str | None = None  # the LoRA adapter folder used with model, if any


@dataclass
class Message:
    id: int
    conversation_id: int
    position: int  # 0, 1, 2 ... within the conversation
    role: str  # "user" or "assistant"
    content: str
    created_at: float
    finished_at: float | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    adapter: str | None = None  # the LoRA adapter on top of model that wrote the reply, if any
    mode: str = "chat"  # the conversation's mode when it was written: "chat" or "generate" (raw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "content": self.content,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "stats": self.stats,
            "settings": self.settings,
            "model": self.model,
            "adapter": self.adapter,
            "mode": self.mode,
        }


@dataclass
class JobRecord:
    id: str
    name: str
    status: str  # queued, running, done, failed or cancelled
    out_dir: str
    base_model: str
    created_at: float
    updated_at: float


class Store:
    def __init__(self, path: Path | str, migrations: tuple[str, ...] = MIGRATIONS, *, read_only: bool = False,
                 busy_timeout: float | None = None):
        """Open (creating if needed) and migrate; raises CorruptDatabase, ReadOnlyDatabase or StoreError.

        read_only: copy the file into memory, so its conversations can be read and nothing is written back.
        """
        self.path = Path(path) if str(path) != ":memory:" else None
        self.read_only = read_only
        timeout = BUSY_TIMEOUT_S if busy_timeout is None else busy_timeout
        created = False
        if self.path is not None and not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
        if self.path is not None and not read_only and not created and not _writable(self.path):
            raise ReadOnlyDatabase(f"{self.path} is read-only; not saved")
        try:
            self._db = self._connect(timeout)
            check = self._db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise CorruptDatabase("; ".join(str(row[0]) for row in check[:3]))
            if self.path is not None and not read_only:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # durable across app crashes in WAL mode
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate(migrations)
            self._check_tables(migrations)
        except (sqlite3.Error, StoreError) as e:
            if hasattr(self, "_db"):
                self._db.close()
            if created:  # never leave an empty database behind (a full disk, an unwritable folder)
                for suffix in ("", "-wal", "-shm"):
                    self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
            raise _store_error(e, self.path) if isinstance(e, sqlite3.Error) else e from None

    def _connect(self, timeout: float) -> sqlite3.Connection:
        if not self.read_only:
            return sqlite3.connect(str(self.path or ":memory:"), isolation_level=None, timeout=timeout)
        copy = sqlite3.connect(":memory:", isolation_level=None)
        uri = self.path.resolve().as_uri()
        # A WAL database on read-only media cannot make its -shm file: then read it as immutable.
        for query in ("mode=ro", "immutable=1"):
            try:
                source = sqlite3.connect(f"{uri}?{query}", uri=True, timeout=timeout)
                try:
                    source.backup(copy)
                finally:
                    source.close()
                return copy
            except sqlite3.Error as e:
                error = e
        copy.close()
        raise error

    def _check_tables(self, migrations: tuple[str, ...]) -> None:
        if migrations is not MIGRATIONS:
            return
        present = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [t for t in TABLES if t not in present]
        if missing:
            raise StoreError(f"{self.path}: the table {missing[0]!r} is missing (schema version {self.version}); "
                             "the file was left untouched")

    @property
    def version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self, migrations: tuple[str, ...]) -> None:
        current = self.version
        if current > len(migrations):
            raise StoreError(
                f"{self.path}: written by a newer chattui (schema version {current}; this one knows up to "
                f"{len(migrations)}); it was left untouched"
            )
        for version in range(current, len(migrations)):
            script = f"BEGIN IMMEDIATE;\n{migrations[version]}\nPRAGMA user_version = {version + 1};\nCOMMIT;"
            try:
                self._db.executescript(script)
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StoreError(f"{self.path}: migration to schema version {version + 1} failed ({e})") from None
            log.info("migrated %s to schema version %d", self.path, version + 1)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on failure); SQLite errors come out as one-line StoreErrors."""
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
        except sqlite3.Error as e:
            raise _store_error(e, self.path) from None

    def _write(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        """One statement in its own committed transaction."""
        with self._transaction() as db:
            return db.execute(sql, params)

    def _rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise _store_error(e, self.path) from None

    # -- conversations ---------------------------------------------------------------------------

    def create_conversation(
        self, title: str = "", mode: str = "chat", settings: dict | None = None, model: str | None = None
    ) -> Conversation:
        now = time.time()
        cur = self._write(
            "INSERT INTO conversations (title, mode, settings, model, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (title, mode, json.dumps(settings or {}), model, now, now),
        )
        return self.conversation(cur.lastrowid)

    def conversation(self, conversation_id: int) -> Conversation:
        rows = self._rows(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = ?",
            (conversation_id,),
        )
        if not rows:
            raise KeyError(conversation_id)
        return _conversation(rows[0])

    def conversations(self) -> list[Conversation]:
        """All conversations, most recently active first."""
        rows = self._rows(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations ORDER BY updated_at DESC, id DESC"
        )
        return [_conversation(r) for r in rows]

    def update_conversation(
        self,
        conversation_id: int,
        *,
        title: str | None = None,
        mode: str | None = None,
        settings: dict | None = None,
        model: str | None = None,
        adapter: str | None = None,
    ) -> Conversation:
        """Change what is given (None: unchanged); adapter "" clears it."""
        changes = {"title": title, "mode": mode, "model": model, "adapter": adapter}
        changes = {k: v for k, v in changes.items() if v is not None}
        if settings is not None:
            changes["settings"] = json.dumps(settings)
        if changes:
            assignments = ", ".join(f"{k} = ?" for k in changes)
            self._write(
                f"UPDATE conversations SET {assignments}, updated_at = ? WHERE id = ?",
                (*changes.values(), time.time(), conversation_id),
            )
        return self.conversation(conversation_id)

    def delete_conversation(self, conversation_id: int) -> None:
        self._write("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # -- messages --------------------------------------------------------------------------------

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        created_at: float | None = None,
        finished_at: float | None = None,
        finish_reason: str | None = None,
        prompt_tokens: int | None = None,
        generated_tokens: int | None = None,
        stats: dict | None = None,
        settings: dict | None = None,
        model: str | None = None,
        adapter: str | None = None,
        mode: str = "chat",
    ) -> Message:
        """Append a message and commit it (with the conversation's activity time) at once."""
        now = time.time()
        with self._transaction() as db:
            (position,) = db.execute(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id = ?", (conversation_id,)
            ).fetchone()
            cur = db.execute(
                "INSERT INTO messages (conversation_id, position, role, content, created_at, finished_at, "
                "finish_reason, prompt_tokens, generated_tokens, stats, settings, model, adapter, mode) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    conversation_id, position, role, content, created_at or now, finished_at, finish_reason,
                    prompt_tokens, generated_tokens, json.dumps(stats or {}), json.dumps(settings or {}), model,
                    adapter, mode,
                ),
            )
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
        return self.message(cur.lastrowid)

    def update_reply(
        self,
        message_id: int,
        content: str,
        *,
        finish_reason: str,
        finished_at: float | None = None,
        prompt_tokens: int | None = None,
        generated_tokens: int | None = None,
        stats: dict | None = None,
    ) -> Message:
        """A reply's text so far (finish_reason "streaming" while it is written) or in the end, with its outcome."""
        self._write(
            "UPDATE messages SET content = ?, finish_reason = ?, finished_at = ?, prompt_tokens = ?, "
            "generated_tokens = ?, stats = ? WHERE id = ?",
            (content, finish_reason, finished_at, prompt_tokens, generated_tokens, json.dumps(stats or {}), message_id),
        )
        return self.message(message_id)

    def mark_interrupted(self) -> int:
        """Replies left "streaming" by a chattui that did not end them (killed, crashed) become "interrupted"."""
        return self._write("UPDATE messages SET finish_reason = 'interrupted' WHERE finish_reason = 'streaming'").rowcount

    def message(self, message_id: int) -> Message:
        rows = self._rows(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise KeyError(message_id)
        return _message(rows[0])

    def messages(self, conversation_id: int) -> list[Message]:
        rows = self._rows(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY position",
            (conversation_id,),
        )
        return [_message(r) for r in rows]

    def edit_and_truncate(self, message_id: int, content: str) -> None:
        """Replace a message's text and delete every later message of its conversation, atomically."""
        msg = self.message(message_id)
        with self._transaction() as db:
            db.execute("UPDATE messages SET content = ?, created_at = ? WHERE id = ?", (content, time.time(), message_id))
            db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND position > ?", (msg.conversation_id, msg.position)
            )
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), msg.conversation_id))

    def delete_message(self, message_id: int) -> None:
        self._write("DELETE FROM messages WHERE id = ?", (message_id,))

    # -- models ----------------------------------------------------------------------------------

    def touch_model(self, path: str) -> None:
        self._write(
            "INSERT INTO recent_models (path, last_used) VALUES (?, ?) "
            "ON CONFLICT(path) DO UPDATE SET last_used = excluded.last_used",
            (path, time.time()),
        )

    def recent_models(self, limit: int = 10) -> list[str]:
        rows = self._rows("SELECT path FROM recent_models ORDER BY last_used DESC LIMIT ?", (limit,))
        return [r[0] for r in rows]

    # -- fine-tune jobs --------------------------------------------------------------------------

    def save_job(self, id: str, *, name: str, status: str, out_dir: str, base_model: str,
                 created_at: float | None = None) -> JobRecord:
        """Add a job, or update its name, status and folder."""
        now = time.time()
        self._write(
            "INSERT INTO jobs (id, name, status, out_dir, base_model, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET name = excluded.name, "
            "status = excluded.status, out_dir = excluded.out_dir, base_model = excluded.base_model, "
            "updated_at = excluded.updated_at",
            (id, name, status, out_dir, base_model, created_at or now, now),
        )
        return self.job(id)

    def set_job_status(self, id: str, status: str) -> None:
        self._write("UPDATE jobs SET status = ?, updated_at = ? WHERE id = ?", (status, time.time(), id))

    def job(self, id: str) -> JobRecord:
        rows = self._rows(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (id,))
        if not rows:
            raise KeyError(id)
        return JobRecord(*rows[0])

    def jobs(self) -> list[JobRecord]:
        """Every job, newest first."""
        rows = self._rows(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created_at DESC, id DESC")
        return [JobRecord(*r) for r in rows]

    def delete_job(self, id: str) -> None:
        self._write("DELETE FROM jobs WHERE id = ?", (id,))


_JOB_COLUMNS = "id, name, status, out_dir, base_model, created_at, updated_at"

_CONVERSATION_COLUMNS = "id, title, mode, settings, model, created_at, updated_at, adapter"

_MESSAGE_COLUMNS = (
    "id, conversation_id, position, role, content, created_at, finished_at, finish_reason, "
    "prompt_tokens, generated_tokens, stats, settings, model, adapter, mode"
)


def _conversation(row) -> Conversation:
    id_, title, mode, settings, model, created, updated, adapter = row
    return Conversation(id_, title, mode, _json(settings), model, created, updated, adapter or None)


def _message(row) -> Message:
    *head, stats, settings, model, adapter, mode = row
    return Message(*head, stats=_json(stats), settings=_json(settings), model=model, adapter=adapter, mode=mode)


def _json(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _writable(path: Path) -> bool:
    """Whether SQLite can write the file and its -wal/-shm files beside it (False on read-only media)."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def open_store(data_dir: Path) -> tuple[Store, str | None]:
    """The store in data_dir, and a notice for the user when something had to be done about it.

    A corrupt file is renamed to `chattui.db.corrupt-<time>` (with its -wal/-shm files) and a new one is
    started. A read-only file is read into memory: its conversations are there, nothing is saved. A
    database that cannot be used at all (locked, newer schema, full disk, unwritable folder) is left as it
    is and gives an empty in-memory store, so the app still works, with a notice that nothing will be saved.
    """
    path = data_dir / DB_FILE
    try:
        return Store(path), None
    except CorruptDatabase as e:
        aside = _move_aside(path)
        notice = f"The conversation database {path} could not be read ({e}). It was moved to {aside}; a new one was started."
        log.warning(notice)
        try:
            return Store(path), notice
        except (StoreError, OSError) as e2:
            return Store(":memory:"), f"{notice} The new one failed too ({e2}); conversations will not be saved."
    except ReadOnlyDatabase:
        try:
            return Store(path, read_only=True), (
                f"{path} is read-only: your conversations are shown, but nothing new will be saved this session."
            )
        except (StoreError, OSError) as e:
            return Store(":memory:"), f"{e}. Conversations will not be saved this session."
    except (StoreError, OSError) as e:
        return Store(":memory:"), f"{e}. Conversations will not be saved this session."


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    path.rename(aside)
    for suffix in ("-wal", "-shm"):
        extra = path.with_name(path.name + suffix)
        if extra.exists():
            extra.rename(aside.with_name(aside.name + suffix))
    return aside
