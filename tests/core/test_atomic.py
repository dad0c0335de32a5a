"""Atomic writes: a failed write leaves nothing behind and says which file and why."""

import errno

import pytest

from rnnflow.core.atomic import atomic_path, write_json
from rnnflow.core.errors import RnnflowError


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "out.json").write_text('{"old": true}\n')

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pathlib.Path.write_text", no_space)
    with pytest.raises(RnnflowError, match="cannot write .*out.json: No space left on device"):
        write_json(tmp_path / "out.json", {"new": True})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    assert (tmp_path / "out.json").read_text() == '{"old": true}\n'


def test_read_only_location_is_a_clear_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(RnnflowError, match="cannot write .*x.json: Read-only file system"):
        write_json(tmp_path / "x.json", {})


def test_other_errors_pass_through_and_clean_up(tmp_path):
    with pytest.raises(ValueError), atomic_path(tmp_path / "f.txt") as tmp:
        tmp.write_text("partial")
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConnectionError), atomic_path(tmp_path / "g.txt"):
        raise ConnectionError("network")  # an OSError, but not about the output location
    assert list(tmp_path.iterdir()) == []
