"""Atomic writes (l2e_dist/fileio.py): a reader sees the old file or the new one, never a part; a failed write
leaves the old file and no temporary behind; outputs get the umask's usual permissions."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from l2e_dist.fileio import atomic_save_npy, atomic_write, atomic_write_json, atomic_write_text


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old\n")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_json_text_and_npy_land_complete_with_umask_permissions(tmp_path):
    written = atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert written.read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'  # sorted keys, indent 1, newline
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~mask != 0o600  # the usual mode, not mkstemp's 0600
    assert atomic_write_text(tmp_path / "b.txt", "x", durable=False).read_text() == "x"
    # np.save picks its format from the name: the temporary keeps the .npy suffix, so no second suffix appears
    saved = atomic_save_npy(tmp_path / "c.npy", np.arange(3, dtype=np.int16))
    assert saved.name == "c.npy" and np.load(saved).tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt", "c.npy"]
