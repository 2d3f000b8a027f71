"""The one atomic writer of every artefact (maest_cli.io.artefacts.atomic_path)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maest_cli.io.artefacts import atomic_path, write_atomic, write_json


def test_a_library_writes_the_temporary_path_and_the_file_appears_whole(tmp_path):
    target = tmp_path / "t.parquet"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".t.parquet.tmp")
        pq.write_table(pa.table({"x": [1, 2]}), tmp)
        assert not target.exists()  # nobody sees it before it is complete
    assert pq.read_table(target)["x"].to_pylist() == [1, 2]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    write_atomic(target, "new")
    assert target.read_text() == "new"
