"""The conversation store: schema version and migrations, WAL, commits that survive a killed process,
and a corrupt or too-new database that is moved aside or left alone, never overwritten."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from faults import fill_disk, hold_exclusive_lock, remount_read_only

from chattui.store import DB_FILE, MIGRATIONS, Store, StoreError, open_store

ROOT = Path(__file__).resolve().parents[2]


def test_new_database_is_at_the_latest_schema_version_in_wal_mode(tmp_path):
    store = Store(tmp_path / DB_FILE)
    assert store.version == len(MIGRATIONS)
    mode = sqlite3.connect(tmp_path / DB_FILE).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_messages_keep_order_stats_and_settings(tmp_path):
    store = Store(tmp_path / DB_FILE)
    c = store.create_conversation(title="t", settings={"temperature": 0.2})
    store.add_message(c.id, "user", "hi")
    store.add_message(c.id, "assistant", "hello", finish_reason="eos", prompt_tokens=5, generated_tokens=2,
                      stats={"ttft_s": 0.1}, settings={"temperature": 0.2}, model="/m")
    messages = store.messages(c.id)
    assert [(m.position, m.role, m.content) for m in messages] == [(0, "user", "hi"), (1, "assistant", "hello")]
    reply = messages[1]
    assert (reply.finish_reason, reply.prompt_tokens, reply.generated_tokens) == ("eos", 5, 2)
    assert reply.stats == {"ttft_s": 0.1} and reply.settings == {"temperature": 0.2} and reply.model == "/m"
    assert store.conversation(c.id).settings == {"temperature": 0.2}


def test_each_message_is_committed_at_once(tmp_path):
    store = Store(tmp_path / DB_FILE)
    c = store.create_conversation()
    store.add_message(c.id, "user", "saved?")
    other = sqlite3.connect(tmp_path / DB_FILE)  # another connection sees only committed data
    assert other.execute("SELECT content FROM messages").fetchall() == [("saved?",)]


def test_a_killed_process_loses_no_committed_message(tmp_path):
    code = (
        "import os, signal, sys\n"
        "from chattui.store import Store\n"
        f"s = Store({str(tmp_path / DB_FILE)!r})\n"
        "c = s.create_conversation(title='x')\n"
        "for i in range(5):\n"
        "    s.add_message(c.id, 'user', f'm{i}')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    store = Store(tmp_path / DB_FILE)
    assert [m.content for m in store.messages(store.conversations()[0].id)] == [f"m{i}" for i in range(5)]


def test_edit_and_truncate_replaces_text_and_drops_later_messages(tmp_path):
    store = Store(tmp_path / DB_FILE)
    c = store.create_conversation()
    first = store.add_message(c.id, "user", "a")
    store.add_message(c.id, "assistant", "b")
    store.add_message(c.id, "user", "c")
    store.edit_and_truncate(first.id, "a2")
    assert [m.content for m in store.messages(c.id)] == ["a2"]
    assert store.add_message(c.id, "assistant", "d").position == 1


def test_deleting_a_conversation_deletes_its_messages(tmp_path):
    store = Store(tmp_path / DB_FILE)
    c = store.create_conversation()
    store.add_message(c.id, "user", "a")
    store.delete_conversation(c.id)
    assert store.conversations() == []
    assert store._db.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)


def test_recent_models_most_recent_first(tmp_path):
    store = Store(tmp_path / DB_FILE)
    for path in ("/a", "/b", "/a"):
        store.touch_model(path)
    assert store.recent_models() == ["/a", "/b"]


# -- migrations --------------------------------------------------------------------------------------


V2 = "ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;"


def test_migration_keeps_data_and_bumps_the_version(tmp_path):
    path = tmp_path / DB_FILE
    old = Store(path)
    c = old.create_conversation(title="kept")
    old.add_message(c.id, "user", "still here")
    old.close()

    store = Store(path, migrations=(*MIGRATIONS, V2))
    assert store.version == len(MIGRATIONS) + 1
    assert store.conversations()[0].title == "kept"
    assert [m.content for m in store.messages(c.id)] == ["still here"]
    assert store._db.execute("SELECT pinned FROM conversations").fetchall() == [(0,)]


def test_a_failing_migration_is_rolled_back_and_reported(tmp_path):
    path = tmp_path / DB_FILE
    Store(path).close()
    broken = "ALTER TABLE conversations ADD COLUMN ok INTEGER; ALTER TABLE no_such_table ADD COLUMN x INTEGER;"
    with pytest.raises(StoreError, match=f"migration to schema version {len(MIGRATIONS) + 1} failed"):
        Store(path, migrations=(*MIGRATIONS, broken))
    store = Store(path)
    assert store.version == len(MIGRATIONS)
    columns = [r[1] for r in store._db.execute("PRAGMA table_info(conversations)")]
    assert "ok" not in columns, "the half-done migration was rolled back"


def test_a_database_from_a_newer_chattui_is_left_untouched(tmp_path):
    path = tmp_path / DB_FILE
    Store(path, migrations=(*MIGRATIONS, V2)).close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="newer chattui"):
        Store(path)
    store, notice = open_store(tmp_path)
    assert "newer chattui" in notice and "will not be saved" in notice
    assert store.path is None  # in memory: the app still works
    assert path.read_bytes() == before


# -- corruption ---------------------------------------------------------------------------------------


def test_a_corrupt_database_is_moved_aside_with_a_notice(tmp_path):
    path = tmp_path / DB_FILE
    path.write_bytes(b"this is not a database at all" * 100)
    store, notice = open_store(tmp_path)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(DB_FILE + ".corrupt-")]
    assert len(aside) == 1
    assert aside[0].read_bytes() == b"this is not a database at all" * 100
    assert str(path) in notice and str(aside[0]) in notice
    assert store.path == path and store.version == len(MIGRATIONS)
    c = store.create_conversation()
    store.add_message(c.id, "user", "fresh start")
    assert Store(path).messages(c.id)[0].content == "fresh start"


def test_a_truncated_database_is_moved_aside(tmp_path):
    path = tmp_path / DB_FILE
    store = Store(path)
    c = store.create_conversation()
    for i in range(200):
        store.add_message(c.id, "user", "x" * 500)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\x00" * 5000 + data[5100: len(data) // 2])
    store, notice = open_store(tmp_path)
    assert notice is not None and "moved to" in notice
    assert store.conversations() == []
    assert any(p.name.startswith(DB_FILE + ".corrupt-") for p in tmp_path.iterdir())


def test_an_intact_database_opens_without_a_notice(tmp_path):
    Store(tmp_path / DB_FILE).close()
    store, notice = open_store(tmp_path)
    assert notice is None and store.path == tmp_path / DB_FILE


# -- locked, read-only, full, incomplete: reported, never moved aside ----------------------------------------


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_locked_database_keeps_its_history_and_a_write_says_it_is_locked(tmp_path, monkeypatch):
    monkeypatch.setattr("chattui.store.BUSY_TIMEOUT_S", 0.2)
    store = Store(tmp_path / DB_FILE)
    c = store.create_conversation(title="kept")
    store.add_message(c.id, "user", "history")
    store.close()
    other = hold_exclusive_lock(tmp_path / DB_FILE)
    store, notice = open_store(tmp_path)
    assert notice is None and store.path == tmp_path / DB_FILE  # WAL: readers are not blocked
    assert [m.content for m in store.messages(c.id)] == ["history"]
    with pytest.raises(StoreError, match="is locked by another program.*not saved"):
        store.add_message(c.id, "user", "while locked")
    other.rollback()
    other.close()
    store.add_message(c.id, "user", "after the lock")
    assert [m.content for m in store.messages(c.id)] == ["history", "after the lock"]
    assert not any(".corrupt-" in name for name in _files(tmp_path))


def test_a_database_locked_against_readers_is_reported_and_left_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr("chattui.store.BUSY_TIMEOUT_S", 0.2)
    store = Store(tmp_path / DB_FILE)
    store.add_message(store.create_conversation().id, "user", "history")
    store._db.execute("PRAGMA journal_mode=DELETE")  # a rollback journal: EXCLUSIVE blocks readers too
    store.close()
    before = (tmp_path / DB_FILE).read_bytes()
    other = hold_exclusive_lock(tmp_path / DB_FILE)
    try:
        store, notice = open_store(tmp_path)
    finally:
        other.rollback()
        other.close()
    assert "is locked by another program" in notice and "will not be saved" in notice
    assert store.path is None
    assert _files(tmp_path) == [DB_FILE] and (tmp_path / DB_FILE).read_bytes() == before


def test_a_missing_table_is_reported_not_treated_as_corruption(tmp_path):
    store = Store(tmp_path / DB_FILE)
    store._db.execute("DROP TABLE recent_models")
    store.close()
    store, notice = open_store(tmp_path)
    assert "'recent_models' is missing" in notice and "left untouched" in notice
    assert store.path is None and _files(tmp_path) == [DB_FILE]


def test_a_read_only_database_is_opened_read_only_with_its_history(tmpfs):
    folder = tmpfs("1m")
    store = Store(folder / DB_FILE)
    c = store.create_conversation(title="old")
    store.add_message(c.id, "user", "from before")
    store.close()
    remount_read_only(folder)
    store, notice = open_store(folder)
    assert "is read-only" in notice and "nothing new will be saved" in notice
    assert [m.content for m in store.messages(c.id)] == ["from before"]
    store.add_message(c.id, "user", "kept in memory")  # the app keeps working, in memory
    assert _files(folder) == [DB_FILE]


def test_a_full_disk_fails_the_write_with_one_line_and_keeps_the_database(tmpfs):
    folder = tmpfs("256k")
    store = Store(folder / DB_FILE)
    c = store.create_conversation()
    store.add_message(c.id, "user", "saved before")
    fill_disk(folder)
    with pytest.raises(StoreError, match="not saved: the disk holding .* is full"):
        store.add_message(c.id, "user", "x" * 200_000)
    assert [m.content for m in store.messages(c.id)] == ["saved before"]
    store.close()
    (folder / "filler").unlink()
    assert [m.content for m in Store(folder / DB_FILE).messages(c.id)] == ["saved before"]


def test_a_database_that_cannot_be_created_on_a_full_disk_leaves_no_empty_file(tmpfs):
    folder = tmpfs("64k")
    fill_disk(folder)
    store, notice = open_store(folder)
    assert store.path is None and "will not be saved" in notice
    assert _files(folder) == ["filler"], "no 0-byte chattui.db left behind"


def test_version_2_messages_become_chat_mode_without_an_adapter(tmp_path):
    path = tmp_path / DB_FILE
    old = Store(path, migrations=MIGRATIONS[:2])
    old._write("INSERT INTO conversations (title, model, created_at, updated_at) VALUES ('old', '/m', 0, 0)")
    old._write("INSERT INTO messages (conversation_id, position, role, content, created_at) VALUES (1, 0, 'user', 'hi', 0)")
    old.close()
    store = Store(path)
    assert (store.conversation(1).model, store.conversation(1).adapter) == ("/m", None)
    [message] = store.messages(1)
    assert (message.content, message.mode, message.adapter) == ("hi", "chat", None)
    assert store.update_conversation(1, adapter="/a").adapter == "/a"
    assert store.update_conversation(1, adapter="").adapter is None, '"" clears the adapter'


def test_a_streaming_reply_is_updated_in_place_and_marked_interrupted_once(tmp_path):
    store = Store(tmp_path / DB_FILE)
    conversation = store.create_conversation()
    store.add_message(conversation.id, "user", "hi")
    reply = store.add_message(conversation.id, "assistant", "", finish_reason="streaming", adapter="/a", mode="generate")
    store.update_reply(reply.id, "Hel", finish_reason="streaming")
    assert store.message(reply.id).content == "Hel"
    store.close()
    again = Store(tmp_path / DB_FILE)
    assert again.mark_interrupted() == 1 and again.mark_interrupted() == 0
    saved = again.message(reply.id)
    assert (saved.content, saved.finish_reason, saved.adapter, saved.mode) == ("Hel", "interrupted", "/a", "generate")
    done = again.update_reply(reply.id, "Hello", finish_reason="eos", generated_tokens=2, stats={"seed": 1})
    assert (done.content, done.finish_reason, done.generated_tokens, done.stats) == ("Hello", "eos", 2, {"seed": 1})
