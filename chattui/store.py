"""Conversations and messages on disk: one SQLite file under the user data dir.

- The schema version is SQLite's `user_version`; `MIGRATIONS[i]` takes a database from version i
  to i + 1, each in one transaction, so a failed migration leaves the file as it was.
- WAL mode, and every write is its own committed transaction: a user message is saved when it is
  sent, a reply when it starts (finish_reason "streaming") and then as it streams, so killing the app
  mid-reply loses no earlier message and at most the last second of the reply; the next start marks
  such a reply "interrupted" (`mark_interrupted`).
- A file that is not a readable database is moved aside (never overwritten) and a fresh one is
  started; `open_store` returns a notice saying where the old file went.
- Used from the UI thread only; every call is a few milliseconds.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DB_FILE = "chattui.db"

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
    def __init__(self, path: Path | str, migrations: tuple[str, ...] = MIGRATIONS):
        """Open (creating if needed) and migrate; raises CorruptDatabase or StoreError."""
        self.path = Path(path) if str(path) != ":memory:" else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        try:
            check = self._db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise CorruptDatabase("; ".join(str(row[0]) for row in check[:3]))
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # durable across app crashes in WAL mode
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate(migrations)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise CorruptDatabase(str(e)) from None
        except StoreError:
            self._db.close()
            raise

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

    def _write(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        """One statement in its own committed transaction."""
        with self._db:
            return self._db.execute(sql, params)

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
        row = self._db.execute(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = ?",
            (conversation_id,),
        ).fetchone()
        if row is None:
            raise KeyError(conversation_id)
        return _conversation(row)

    def conversations(self) -> list[Conversation]:
        """All conversations, most recently active first."""
        rows = self._db.execute(
            f"SELECT {_CONVERSATION_COLUMNS} FROM conversations ORDER BY updated_at DESC, id DESC"
        ).fetchall()
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
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            (position,) = self._db.execute(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id = ?", (conversation_id,)
            ).fetchone()
            cur = self._db.execute(
                "INSERT INTO messages (conversation_id, position, role, content, created_at, finished_at, "
                "finish_reason, prompt_tokens, generated_tokens, stats, settings, model, adapter, mode) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    conversation_id, position, role, content, created_at or now, finished_at, finish_reason,
                    prompt_tokens, generated_tokens, json.dumps(stats or {}), json.dumps(settings or {}), model,
                    adapter, mode,
                ),
            )
            self._db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
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
        row = self._db.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise KeyError(message_id)
        return _message(row)

    def messages(self, conversation_id: int) -> list[Message]:
        rows = self._db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY position",
            (conversation_id,),
        ).fetchall()
        return [_message(r) for r in rows]

    def edit_and_truncate(self, message_id: int, content: str) -> None:
        """Replace a message's text and delete every later message of its conversation, atomically."""
        msg = self.message(message_id)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE messages SET content = ?, created_at = ? WHERE id = ?", (content, time.time(), message_id))
            self._db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND position > ?", (msg.conversation_id, msg.position)
            )
            self._db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), msg.conversation_id))

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
        rows = self._db.execute("SELECT path FROM recent_models ORDER BY last_used DESC LIMIT ?", (limit,))
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
        row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise KeyError(id)
        return JobRecord(*row)

    def jobs(self) -> list[JobRecord]:
        """Every job, newest first."""
        rows = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created_at DESC, id DESC")
        return [JobRecord(*r) for r in rows.fetchall()]

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


def open_store(data_dir: Path) -> tuple[Store, str | None]:
    """The store in data_dir, and a notice for the user when something had to be done about it.

    A corrupt file is renamed to `chattui.db.corrupt-<time>` (with its -wal/-shm files) and a new
    one is started. A database that cannot be used at all (newer schema, unwritable folder) gives
    an in-memory store, so the app still works, with a notice that nothing will be saved.
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
        except (StoreError, OSError, sqlite3.Error) as e2:
            return Store(":memory:"), f"{notice} The new one failed too ({e2}); conversations will not be saved."
    except (StoreError, OSError, sqlite3.Error) as e:
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
