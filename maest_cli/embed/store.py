"""The output directory of `maest extract`: a Parquet dataset that survives kills and is
shared by the shards of one run.

Layout of DIR (readers skip names starting with '_' or '.', so the dataset is one schema):

    part-<shard>-<run>-<seq>.parquet   committed rows; every file is written to a temporary
                                       name and renamed into place, so it is whole or absent
    _maest_extract.json                the settings that made the rows (checked on resume)
    _errors/errors.parquet             files that failed in the latest run: path, root, stage,
                                       reason (errors-s<I>of<N>.parquet per shard; read them all
                                       with pandas.read_parquet("DIR/_errors"))
    .staging-<shard>/<key>.arrow       one finished audio file each, waiting for the next part
    .maest-extract*.lock               flock files (the kernel drops them when a process dies)

The errors live in a subfolder so that globs like "DIR/*.parquet" (polars, DuckDB) see the
embeddings only. The errors file is rewritten whole (temp file + rename) at most every
ERRORS_FLUSH_SECONDS and at each part and at the end: always readable; a kill loses at most
the last second of it (those files are retried by the next run anyway).

Each finished audio file is staged at once (atomically), so a kill loses only the files in
flight; staged files are merged into a part every `files_per_part` files and at the end,
and a later run merges what a killed run left. Parts are authoritative: a staged file whose
key is already in a part (a kill between writing the part and deleting the staging) is
dropped, so each audio file ends up in the dataset exactly once.

A failed write (disk full, quota) raises OSError naming the file; the store then writes
nothing more (no second temporary file): the staged files wait for the next run.

Locks: an unsharded run holds DIR exclusively; the shards of one run share it (all with the
same shard count) and each holds its own shard lock. Lock changes happen under a short
exclusive "meta" lock, so there are no races between runs starting together.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from maest_cli.errors import MaestError, UsageError
from maest_cli.io.artefacts import atomic_path, write_atomic

FORMAT = "maest-extract/1"
MANIFEST = "_maest_extract.json"
METADATA_KEY = b"maest"
LOCK = ".maest-extract.lock"
META_LOCK = ".maest-extract.meta.lock"
PART_GLOB = "part-*.parquet"
ERRORS_DIR = "_errors"
ERRORS_SCHEMA = pa.schema([("path", pa.string()), ("root", pa.string()), ("stage", pa.string()),
                           ("reason", pa.string())])
ERRORS_FLUSH_SECONDS = 1.0


class StoreBusy(UsageError):
    """Another run is writing the same DIR (or the same shard of it)."""


class SettingsMismatch(UsageError):
    """DIR holds rows made with other settings; mixing them would make a meaningless dataset."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @property
    def tag(self) -> str:
        return f"s{self.index}of{self.count}"


def _flock(fd: int, mode: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class StoreWriteError(MaestError, OSError):
    """A write into DIR failed; the message names the file: "PATH: cannot write (reason)"."""

    def __str__(self) -> str:
        return str(self.strerror)


@contextlib.contextmanager
def _writing(path: Path, tmp: Path | None = None):
    """Turn an I/O error into StoreWriteError naming `path`, removing the temporary file."""
    try:
        yield
    except OSError as e:  # pyarrow's write errors are OSErrors too
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if isinstance(e, StoreWriteError):
            raise
        reason = e.strerror or " ".join(str(e).split())[:200] or type(e).__name__
        raise StoreWriteError(e.errno or errno.EIO, f"{path}: cannot write ({reason})") from e


def _text(s: object) -> str:
    """Valid UTF-8 for Arrow (a reason may carry undecodable bytes of a file name)."""
    return str(s).encode("utf-8", "backslashreplace").decode("utf-8")


def read_errors(out: str | os.PathLike) -> pa.Table:
    """The failures recorded in an extraction DIR (every shard's), as a table
    path, root, stage, reason; empty when there are none."""
    files = sorted(p for p in (Path(out) / ERRORS_DIR).glob("*.parquet"))
    tables = [pq.read_table(p, schema=ERRORS_SCHEMA) for p in files]
    return pa.concat_tables(tables) if tables else ERRORS_SCHEMA.empty_table()


def key_name(key: tuple[str, str]) -> str:
    """A file name for one audio file's staged rows, the same in every run."""
    return hashlib.sha1(f"{key[0]}\0{key[1]}".encode()).hexdigest()[:32]


def read_part_keys(part: Path) -> set[tuple[str, str]]:
    t = pq.ParquetFile(part).read(columns=["root", "path"])
    return set(zip(t.column("root").to_pylist(), t.column("path").to_pylist()))


def read_metadata(out: str | os.PathLike) -> dict:
    """The provenance record of an extraction DIR (model, checksum, preset, versions, ...)."""
    p = Path(out) / MANIFEST
    if p.is_file():
        return json.loads(p.read_text())["metadata"]
    parts = sorted(Path(out).glob(PART_GLOB))
    if not parts:
        raise FileNotFoundError(f"{out}: not a maest extract directory (no {MANIFEST}, no parts)")
    return json.loads(pq.read_schema(parts[0]).metadata[METADATA_KEY])


class EmbeddingStore:
    """Rows in, Parquet parts out; see the module docstring for the guarantees."""

    def __init__(self, out: str | os.PathLike, schema: pa.Schema, settings: dict, metadata: dict,
                 shard: Shard | None = None, overwrite: bool = False, files_per_part: int = 512):
        if files_per_part < 1:
            raise UsageError("files_per_part must be >= 1")
        self.out = Path(out)
        self.settings = json.loads(json.dumps(settings))  # tuples -> lists, as on disk
        self.metadata = metadata
        self.schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
        self.shard = shard
        self.overwrite = overwrite
        self.files_per_part = files_per_part
        self.tag = shard.tag if shard else "all"
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + f"-{secrets.token_hex(3)}"
        self.staging = self.out / f".staging-{self.tag}"
        self.errors_path = self.out / ERRORS_DIR / ("errors.parquet" if shard is None else f"errors-{self.tag}.parquet")
        self.warnings: list[str] = []
        self.parts_written: list[Path] = []
        self._committed: set[tuple[str, str]] = set()
        self._staged: list[Path] = []
        self._lock_fds: list[int] = []
        self._errors: list[tuple[str, str, str, str]] = []
        self._errors_written = 0  # how many of them are on disk
        self._errors_flushed_at = float("-inf")
        self._seq = 0
        self.write_failed = False  # a write failed: write nothing more (see the module docstring)
        self.n_errors = 0

    # ------------------------------------------------------------ opening

    def open(self) -> EmbeddingStore:
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out}: exists and is not a directory")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {self.out}: cannot create ({e.strerror})") from None
        if not os.access(self.out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {self.out}: not writable")
        meta_fd = os.open(self.out / META_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(meta_fd, fcntl.LOCK_EX)  # short: held only while this method runs
            try:
                self._take_locks()
                self._check_manifest()
                self._committed = self._read_committed()
                self._recover()
                self._reset_errors()
            except BaseException:
                self._release()
                raise
        finally:
            os.close(meta_fd)  # closing drops the meta lock
        return self

    def _lock_file(self, name: str) -> int:
        fd = os.open(self.out / name, os.O_RDWR | os.O_CREAT, 0o644)
        self._lock_fds.append(fd)
        return fd

    def _take_locks(self) -> None:
        import fcntl

        group = self._lock_file(LOCK)
        if self.shard is None:
            if not _flock(group, fcntl.LOCK_EX):
                raise StoreBusy(f"--out {self.out}: another `maest extract` is writing this directory; "
                                "wait for it to finish, or use another --out")
            return
        n = self.shard.count
        if _flock(group, fcntl.LOCK_EX):  # first shard in: record the shard count
            os.ftruncate(group, 0)
            os.pwrite(group, str(n).encode(), 0)
            fcntl.flock(group, fcntl.LOCK_SH)  # not atomic, but every locker waits on the meta lock
        else:
            if not _flock(group, fcntl.LOCK_SH):
                raise StoreBusy(f"--out {self.out}: an unsharded `maest extract` is writing this directory")
            active = os.pread(group, 32, 0).decode(errors="replace").strip()
            if active != str(n):
                raise StoreBusy(f"--out {self.out}: shards of a run with {active or '?'} shards are writing "
                                f"this directory; this run has {n}: use the same shard count")
        if not _flock(self._lock_file(f".maest-extract.shard-{self.shard.index}.lock"), fcntl.LOCK_EX):
            raise StoreBusy(f"--out {self.out}: shard {self.shard.index}/{n} is already running")

    def _release(self) -> None:
        for fd in self._lock_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._lock_fds = []

    def _check_manifest(self) -> None:
        path = self.out / MANIFEST
        if path.is_file():
            try:
                manifest = json.loads(path.read_text())
                old = manifest["settings"]
            except (OSError, ValueError, KeyError) as e:
                raise UsageError(f"{path}: unreadable ({e}); use --overwrite to start again") from None
            if old == self.settings and not self.overwrite:
                return
            if old != self.settings and not self.overwrite:
                raise SettingsMismatch(
                    f"--out {self.out} holds embeddings made with other settings ({_diff(old, self.settings)}); "
                    "use the same settings to resume, another --out, or --overwrite to discard them")
            self._wipe()
        else:
            strays = [p.name for p in self.out.glob("*.parquet")]
            if strays:
                raise UsageError(f"--out {self.out}: holds Parquet files not written by `maest extract` "
                                 f"({', '.join(sorted(strays)[:3])}); use an empty or new directory")
        with _writing(path):
            write_atomic(path, json.dumps({"format": FORMAT, "settings": self.settings, "metadata": self.metadata},
                                          indent=1))

    def _wipe(self) -> None:
        """--overwrite: remove what earlier runs wrote (only our own file names)."""
        for p in [*self.out.glob(PART_GLOB), *self.out.glob("_errors*.tsv"), *self.out.glob(".part-*.tmp*")]:
            p.unlink(missing_ok=True)
        shutil.rmtree(self.out / ERRORS_DIR, ignore_errors=True)
        for d in self.out.glob(".staging-*"):
            shutil.rmtree(d, ignore_errors=True)

    def _read_committed(self) -> set[tuple[str, str]]:
        keys: set[tuple[str, str]] = set()
        for part in sorted(self.out.glob(PART_GLOB)):
            try:
                keys |= read_part_keys(part)
            except (OSError, pa.ArrowException, KeyError) as e:
                aside = part.with_name(f"_corrupt-{part.name}.bad")  # no .parquet: no reader picks it up
                os.replace(part, aside)
                self.warnings.append(f"{part}: unreadable part file moved to {aside.name} ({e}); "
                                     "its audio files will be extracted again")
        return keys

    def _recover(self) -> None:
        """Merge staged files left by killed runs into parts: our own, and those of any run
        that cannot be live (unsharded runs, other shard counts, shards whose lock is free)."""
        import fcntl

        mine = ".part-*.tmp*" if self.shard is None else f".part-{self.tag}-*.tmp*"  # others may be live
        for tmp in [*self.out.glob(mine), *self.staging.glob(".*.tmp")]:
            tmp.unlink(missing_ok=True)
        for d in sorted(self.out.glob(".staging-*")):
            tag = d.name[len(".staging-"):]
            held = None
            if self.shard is not None and tag != self.tag and tag.startswith("s") and tag.endswith(
                    f"of{self.shard.count}"):
                index = tag[1:].split("of")[0]
                held = os.open(self.out / f".maest-extract.shard-{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                if not _flock(held, fcntl.LOCK_EX):  # that shard is running: its staging is live
                    os.close(held)
                    continue
            try:
                self._merge_staged(sorted(d.glob("*.arrow")), tag=tag)
                if d != self.staging:
                    shutil.rmtree(d, ignore_errors=True)
            finally:
                if held is not None:
                    os.close(held)

    def _reset_errors(self) -> None:
        """The errors file lists the failures of the latest run (failed files are retried).
        (_errors*.tsv: the format of earlier versions.)"""
        d = self.out / ERRORS_DIR
        if self.shard is None:
            targets = [*self.out.glob("_errors*.tsv"), *d.glob("*.parquet"), *d.glob(".*.tmp*")]
        else:  # its own file, and those of runs that cannot be live (unsharded, other shard counts)
            others = {f"errors-s{i}of{self.shard.count}.parquet" for i in range(self.shard.count)
                      if i != self.shard.index}
            targets = [self.out / f"_errors-{self.tag}.tsv", *d.glob(f".{self.errors_path.name}.tmp*"),
                       *(p for p in d.glob("*.parquet") if p.name not in others)]
        for p in targets:
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------ writing

    def done_keys(self) -> set[tuple[str, str]]:
        return set(self._committed)

    def add(self, key: tuple[str, str], table: pa.Table) -> None:
        """Stage one audio file's rows (atomically); merge into a part when enough are staged."""
        self._check_writable()
        name = key_name(key) + ".arrow"
        tmp = self.staging / f".{name}.tmp"
        table = table.cast(self.schema.remove_metadata()) if table.schema != self.schema.remove_metadata() else table
        with self._writing(self.staging / name, tmp):
            self.staging.mkdir(exist_ok=True)
            with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            os.replace(tmp, self.staging / name)
        self._staged.append(self.staging / name)
        if len(self._staged) >= self.files_per_part:
            self.commit()
        elif self._errors_written < len(self._errors):
            self._flush_errors()

    def _check_writable(self) -> None:
        if self.write_failed:
            raise StoreWriteError(errno.EIO, f"{self.out}: an earlier write failed; nothing more is written")

    @contextlib.contextmanager
    def _writing(self, path: Path, tmp: Path | None = None):
        try:
            with _writing(path, tmp):
                yield
        except OSError:
            self.write_failed = True
            raise

    def commit(self) -> None:
        """Merge this run's staged files into one new part file (and write the errors file)."""
        self._check_writable()
        if self._staged:
            self._merge_staged(self._staged, tag=self.tag)
            self._staged = []
        self._flush_errors(force=True)

    def _merge_staged(self, files: list[Path], tag: str) -> None:
        tables, keys = [], set()
        for f in files:
            try:
                with pa.OSFile(str(f), "rb") as src:  # read into memory: the file is deleted below
                    t = ipc.open_file(src).read_all()
            except (OSError, pa.ArrowException) as e:
                self.warnings.append(f"{f}: unreadable staged result dropped ({e}); that file will be redone")
                f.unlink(missing_ok=True)
                continue
            k = (t.column("root")[0].as_py(), t.column("path")[0].as_py()) if t.num_rows else None
            if k is None or k in self._committed or k in keys:
                continue
            if t.schema.remove_metadata() != self.schema.remove_metadata():
                self.warnings.append(f"{f}: staged with another schema, dropped; that file will be redone")
                continue
            keys.add(k)
            tables.append(t)
        if tables:
            table = pa.concat_tables(tables).sort_by(
                [("root", "ascending"), ("path", "ascending")]
                + ([("segment", "ascending")] if "segment" in self.schema.names else []))
            self._write_part(table.replace_schema_metadata(self.schema.metadata), tag)
            self._committed |= keys
        for f in files:
            f.unlink(missing_ok=True)

    def _write_part(self, table: pa.Table, tag: str) -> None:
        name = f"part-{tag}-{self.run_id}-{self._seq:05d}.parquet"
        self._seq += 1
        with self._writing(self.out / name), atomic_path(self.out / name) as tmp, open(tmp, "wb") as f:
            pq.write_table(table, f)
        _fsync_dir(self.out)
        self.parts_written.append(self.out / name)

    def record_error(self, root: str, path: str, stage: str, reason: str) -> None:
        """A failure of this run, written to the errors file soon (see the module docstring)."""
        self._errors.append((_text(path), _text(root), _text(stage), _text(reason)))
        self.n_errors += 1
        self._flush_errors()

    def _flush_errors(self, force: bool = False) -> None:
        """Rewrite the errors file whole, atomically; at most every ERRORS_FLUSH_SECONDS unless forced."""
        if self._errors_written == len(self._errors) or self.write_failed:
            return
        if not force and time.monotonic() - self._errors_flushed_at < ERRORS_FLUSH_SECONDS:
            return
        table = pa.table([list(col) for col in zip(*self._errors)], schema=ERRORS_SCHEMA)
        with self._writing(self.errors_path):
            self.errors_path.parent.mkdir(exist_ok=True)
            with atomic_path(self.errors_path) as tmp, open(tmp, "wb") as f:
                pq.write_table(table, f)
        self._errors_written = len(self._errors)
        self._errors_flushed_at = time.monotonic()

    def close(self) -> None:
        try:
            if not self.write_failed:  # after a failed write: write nothing more, leave no second .tmp
                self.commit()
        finally:
            if self.staging.is_dir() and not any(self.staging.iterdir()):
                with contextlib.suppress(OSError):
                    self.staging.rmdir()
            self._release()

    def __enter__(self) -> EmbeddingStore:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def _diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    parts = [f"{k}: DIR has {old.get(k)!r}, this run {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    text = "; ".join(parts)
    return text if len(text) < 400 else text[:400] + "..."
