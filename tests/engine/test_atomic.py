"""engine.atomic.atomic_folder and atomic_file: the whole new folder or file or the old one, never a mix or a
leftover."""

from __future__ import annotations

import pytest

from engine.atomic import atomic_file, atomic_folder


def test_success_replaces_the_old_folder_whole(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_folder(final) as tmp:
        assert tmp.parent == final.parent and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # untouched while writing
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary or old folder left


def test_an_error_while_writing_keeps_the_old_folder_and_removes_the_temporary(tmp_path):
    final = tmp_path / "nested" / "model"
    final.mkdir(parents=True)
    (final / "weights").write_text("good")
    with pytest.raises(OSError, match="disk full"):
        with atomic_folder(final) as tmp:
            (tmp / "weights").write_text("half")
            raise OSError("disk full")
    assert (final / "weights").read_text() == "good"
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]


def test_a_new_folder_and_its_parents_are_created(tmp_path):
    final = tmp_path / "a" / "b" / "checkpoint"
    with atomic_folder(final) as tmp:
        (tmp / "meta.json").write_text("{}")
    assert (final / "meta.json").read_text() == "{}"


def test_a_file_is_replaced_whole_or_left_as_it_was(tmp_path):
    final = tmp_path / "model.gguf"
    final.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_file(final) as tmp:
            tmp.write_bytes(b"half")
            assert final.read_bytes() == b"old"
            raise OSError("disk full")
    assert final.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    with atomic_file(final) as tmp:
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
