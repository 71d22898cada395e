"""compiled_unet._atomic.write_atomic: all or nothing, normal permissions."""
import os
import stat

import pytest

from compiled_unet._atomic import write_atomic


def test_writes_and_replaces_with_umask_permissions(tmp_path):
    path = tmp_path / "out.txt"
    write_atomic(path, "one")
    write_atomic(path, b"two")
    assert path.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    write_atomic(path, "good")
    with pytest.raises(TypeError):
        write_atomic(path, 123)  # not str/bytes: fails while writing the temp file
    assert path.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
