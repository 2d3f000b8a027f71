"""`maest datasets download|info|list`: fetch, verify, unpack and describe the datasets.

Every file comes through io.download (resumable .part + Range, bounded retries, a free-disk check
before each transfer); archives are unpacked by datasets.archives (inside the root only, every
member checked). The manifest (written atomically after each step) says what is there, from where,
each file's sha256 and how it was checked, so an interrupted run resumes and a finished one is
left alone.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from maest_cli.datasets.archives import (
    ArchiveError,
    UnsafeMember,
    safe_member_path,
    tar_members,
    untar,
    unzip_parts,
    zip_members,
)
from maest_cli.datasets.layout import (
    MANIFEST,
    DatasetMissing,
    audio_folder,
    canonical_name,
    dataset_dir,
    default_root,
    download_command,
    locate,
    mtt_clip_paths,
    read_manifest,
)
from maest_cli.errors import MaestError, UsageError
from maest_cli.io.artefacts import check_work_dir, sha256_file, tool_versions, write_json
from maest_cli.io.config import read_toml
from maest_cli.io.download import (
    DownloadError,
    NoSpaceError,
    VerificationError,
    check_free_space,
    download_with_digest,
    offline,
)

MIRROR_ENV = "MAEST_DATASETS_MIRROR"
DOWNLOADS = "downloads"  # archives wait here (ROOT/NAME/downloads) until they are unpacked
UNPACKED_PER_PART = 1.1  # MTT's unpacked mp3s per byte of zip: deflate barely shrinks mp3, a tenth to spare


class DatasetCorrupt(MaestError):
    """An archive that failed its checks twice, or unpacked files that do not match the published lists."""


class NetworkDisabled(DownloadError):
    """Files must be fetched but MAEST_OFFLINE is set."""


@dataclass
class DownloadSummary:
    """What one `download` did: the dataset's folder, what was fetched and unpacked, and what failed."""

    name: str
    root: Path  # the dataset's folder
    manifest: Path
    already_complete: bool
    fetched: list[str] = field(default_factory=list)  # files transferred in this run
    unpacked: list[str] = field(default_factory=list)  # archives unpacked (and checked) in this run
    failed: list[str] = field(default_factory=list)  # one line each: the file and the reason
    coverage: str = ""
    complete: bool = False
    licence: str = ""


def sources(base_url: str | None = None) -> dict:
    """configs/datasets.toml with every URL pointed at the mirror (base_url or $MAEST_DATASETS_MIRROR), if any."""
    cfg = read_toml("datasets.toml")
    mirror = base_url or os.environ.get(MIRROR_ENV)
    if mirror:
        mirror = mirror.rstrip("/")
        cfg["mtt"]["base_url"] = f"{mirror}/mtt"
        cfg["mtg-jamendo"]["metadata_url"] = f"{mirror}/mtg-jamendo/metadata"
        cfg["mtg-jamendo"]["audio_url"] = f"{mirror}/mtg-jamendo"
    return cfg


def parse_tars(spec: str | None, total: int) -> list[str]:
    """'0-9', '3,5,7-9' or None (all) -> the tar numbers as two digits ('00', '01', ...)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return [f"{i:02d}" for i in range(total)]
    got: set[int] = set()
    for piece in spec.split(","):
        a, dash, b = piece.strip().partition("-")
        try:
            lo, hi = int(a), int(b) if dash else int(a)
        except ValueError:
            raise UsageError(f"--tars {spec}: expected numbers and ranges such as 0-9 or 3,5,7-9") from None
        if not (0 <= lo <= hi < total):
            raise UsageError(f"--tars {spec}: {piece.strip()} is not a range within 0-{total - 1}")
        got.update(range(lo, hi + 1))
    return [f"{i:02d}" for i in sorted(got)]


def list_datasets(root: str | Path | None = None) -> list[dict]:
    """Each dataset: its name, title, the folder it goes to, and what of it is there."""
    _check_root(root)
    cfg = sources()
    rows = []
    for name in ("mtt", "mtg-jamendo"):
        try:
            loc = locate(name, root)
            state, coverage = ("complete" if loc.complete else "partial"), str(loc.coverage)
        except DatasetMissing:  # a manifest without what it needs: a download that stopped
            state, coverage = ("incomplete" if read_manifest(dataset_dir(name, root)) else "missing"), ""
        rows.append({"name": name, "title": cfg[name]["title"], "folder": str(dataset_dir(name, root)),
                     "state": state, "coverage": coverage, "size": _size_text(cfg, name)})
    return rows


def _check_root(root: str | Path | None) -> None:
    """--root is a directory or can become one (a file there is a usage error, not a missing dataset)."""
    check_work_dir(root if root is not None else default_root(), "--root" if root is not None else "$MAEST_DATA")


def _size_text(cfg: dict, name: str) -> str:
    if name == "mtt":
        return f"~{cfg['mtt']['approx_bytes'] / 1e9:.0f} GB of mp3 (zip)"
    q = cfg["mtg-jamendo"]["quality"]
    return ", ".join(f"{k}: ~{v['approx_bytes'] / 1e9:.0f} GB ({cfg['mtg-jamendo']['tars']} tars)" for k, v in q.items())


def dataset_info(name: str, root: str | Path | None = None) -> dict:
    """Sources, licence, folder and (when downloaded) the manifest's account of a dataset."""
    key = canonical_name(name)
    _check_root(root)
    cfg = sources()[key]
    folder = dataset_dir(key, root)
    info = {"name": key, "title": cfg["title"], "page": cfg["page"], "folder": str(folder),
            "licence": " ".join(cfg["licence"].split())}
    if key == "mtt":
        info["files"] = [f"{cfg['base_url']}/{f}" for f in [cfg["annotations"], *cfg["parts"]]]
    else:
        info["commit"] = cfg["commit"]
        info["files"] = [f"{cfg['metadata_url']}/...", f"{cfg['audio_url']}/<type>/raw_30s_<type>-NN.tar"]
    info["size"] = _size_text(sources(), key)
    try:
        loc = locate(key, root)
        info.update(state="complete" if loc.complete else "partial", coverage=str(loc.coverage),
                    annotations_root=str(loc.annotations_root), audio_root=str(loc.audio_root))
    except DatasetMissing as e:
        info.update(state="incomplete" if read_manifest(folder) else "missing", fix=str(e))
    manifest = read_manifest(folder)
    if manifest is not None:
        info["manifest"] = manifest
    return info


def download_dataset(name: str, root: str | Path | None = None, tars: str | None = None, quality: str = "low",
                     base_url: str | None = None, progress: bool = True, keep_archives: bool = False,
                     log: Callable[[str], None] | None = None) -> DownloadSummary:
    """Fetch, verify and unpack a dataset under root (default: default_root()); rerunning resumes.

    tars (MTG-Jamendo): which audio tars, e.g. '0-9' or '3,5,7-9' (default all 100); quality: 'low'
    (mono MP3) or 'high' (320 kbps). base_url: a mirror holding the same files (tests use a loopback one).
    log: called with a line after each archive is checked and unpacked (the CLI prints it on stderr).
    """
    key = canonical_name(name)
    _check_root(root)
    cfg = sources(base_url)
    folder = dataset_dir(key, root)
    job = _Job(key, folder, cfg, root, progress, keep_archives, log or (lambda line: None))
    if key == "mtt":
        if tars is not None:
            raise UsageError("--tars: only mtg-jamendo comes in tars (mtt is one zip in three parts)")
        if quality != "low":
            raise UsageError("--quality: only mtg-jamendo comes in two qualities")
        job.mtt()
    else:
        job.mtg(parse_tars(tars, int(cfg["mtg-jamendo"]["tars"])), quality)
    s = job.summary
    try:
        loc = locate(key, root)
        s.coverage, s.complete = str(loc.coverage), loc.complete
    except DatasetMissing as e:
        s.coverage = f"none ({e})"
    return s


class _Job:
    """One download run of one dataset: the manifest it keeps, the files it fetches."""

    def __init__(self, key: str, folder: Path, cfg: dict, root, progress: bool, keep_archives: bool,
                 log: Callable[[str], None]):
        self.key, self.folder, self.cfg, self.src = key, folder, cfg, cfg[key]
        self.root, self.progress, self.keep, self.log = root, progress, keep_archives, log
        self.retries, self.backoff = int(cfg.get("retries", 3)), float(cfg.get("backoff_seconds", 2.0))
        self.manifest = read_manifest(folder) or {}
        self.summary = DownloadSummary(key, folder, folder / MANIFEST, False,
                                       licence=" ".join(self.src["licence"].split()))
        self._versions: dict | None = None

    # ------------------------------------------------------------------ shared steps

    def save(self) -> None:
        if self._versions is None:
            self._versions = tool_versions()
        m = self.manifest
        m.update(dataset=self.key, title=self.src["title"], page=self.src["page"],
                 licence=" ".join(self.src["licence"].split()), tool=self._versions,
                 updated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / MANIFEST, m)

    def drop_archives(self, paths: list[Path]) -> None:
        """Delete archives whose contents the saved manifest records as unpacked (unless --keep-archives)."""
        if not self.keep:
            for p in paths:
                p.unlink(missing_ok=True)

    def need_network(self) -> None:
        if offline():
            raise NetworkDisabled(f"{self.key}: files must be downloaded but MAEST_OFFLINE is set; unset it and run "
                                f"`{download_command(self.key, self.root)}`")

    def fetch(self, url: str, dest: Path, sha256: str | None, unpack_ratio: float) -> str:
        """One file, resumable and retried; returns its sha256 (checked against sha256 when given)."""
        _, digest = download_with_digest(url, dest, sha256, None, self.progress, 60.0, self.retries, self.backoff,
                                         unpack_ratio)
        self.summary.fetched.append(dest.name)
        return digest

    def fetch_small(self, url: str, dest: Path, record: dict, rel: str, check: str) -> None:
        """A small file recorded in `record[rel]`: fetched unless present with the recorded sha256."""
        known = record.get(rel)
        if known and dest.is_file() and sha256_file(dest) == known["sha256"]:
            return
        self.need_network()
        digest = self.fetch(url, dest, None, 0.0)
        record[rel] = {"url": url, "sha256": digest, "bytes": dest.stat().st_size, "check": check}

    # ------------------------------------------------------------------ MagnaTagATune

    def mtt(self) -> None:
        src, m = self.src, self.manifest
        ann = self.folder / src["annotations"]
        audio = self.folder / "audio"
        if m.get("audio", {}).get("unpacked") and ann.is_file() and audio.is_dir():
            self.summary.already_complete = True
            self.drop_archives([self.folder / DOWNLOADS / p for p in src["parts"]])  # left by a kill after the save
            return
        m.setdefault("source", {"base_url": src["base_url"], "page": src["page"]})
        files = m.setdefault("files", {})
        nohash = "MagnaTagATune publishes no checksums: sha256 recorded at download"
        self.fetch_small(f"{src['base_url']}/{src['annotations']}", ann, files, src["annotations"], nohash)
        try:
            _check_mtt_annotations(ann, int(src["clips"]))
        except DatasetCorrupt:
            files.pop(src["annotations"], None)
            self.save()
            raise
        self.save()
        dl = self.folder / DOWNLOADS
        parts = [dl / p for p in src["parts"]]
        for attempt in (1, 2):
            for k, p in enumerate(parts):
                self._mtt_part(p, files, nohash, len(parts) - 1 - k + UNPACKED_PER_PART * len(parts))
            try:
                infos = zip_members(parts, "mp3.zip.001-003")
                for info in infos:
                    safe_member_path(audio, info.filename, "mp3.zip.001-003")
                missing = sum(i.file_size for i in infos if not i.is_dir()
                              and not (audio / i.filename).is_file())
                check_free_space(self.folder, missing, "unpacking mp3.zip.001-003")
                counts = unzip_parts(parts, audio, "mp3.zip.001-003", self.progress)
                break
            except UnsafeMember as e:  # fetching again would not help unless the source changed: the user says
                raise UnsafeMember(f"{e}; the parts stay in {dl} (delete that folder to fetch them again)") from None
            except ArchiveError as e:
                if attempt == 2:
                    raise DatasetCorrupt(f"{e} (fetched twice; both copies fail the check)") from None
                for p in parts:  # corrupt: fetch the parts again, once
                    p.unlink(missing_ok=True)
                    files.pop(p.name, None)
                self.save()
        paths = mtt_clip_paths(ann)
        found = sum((audio / p).is_file() for p in paths)
        if not found:
            raise DatasetCorrupt(f"mp3.zip.001-003: none of the {len(paths)} mp3_path of {ann.name} is under {audio} "
                                 f"(e.g. {paths[0]}); the zip does not hold MagnaTagATune's folders 0-f")
        m["audio"] = {"unpacked": True, "folder": "audio", "members": counts["members"], "bytes": counts["bytes"],
                      "check": "CRC-32 and size of every zip member, checked while unpacking",
                      "annotated_clips": len(paths), "annotated_clips_with_audio": found, "parts_kept": self.keep}
        self.summary.unpacked.append("mp3.zip.001-003")
        self.log(f"mtt: mp3.zip.001-003 unpacked, {counts['members']} members CRC-checked, {found} of {len(paths)} "
                 f"annotated clips have audio")
        self.save()  # the manifest says unpacked before the archives go: a kill between costs no re-download
        self.drop_archives(parts)

    def _mtt_part(self, part: Path, files: dict, check: str, room: float) -> None:
        """One part of the zip. `room`: how many more part-sizes the disk must hold besides this one,
        checked once its size is known and before its first byte: the parts still to come (`split`
        cuts equal parts, the last one smaller) and the unpacked clips (about the whole zip), so a
        disk too small for the whole is refused before the first part, not after 3 GB."""
        if part.is_file() and part.name in files:
            return
        if part.is_file():  # renamed into place, but the run stopped before the manifest said so
            files[part.name] = {"url": f"{self.src['base_url']}/{part.name}", "sha256": sha256_file(part),
                                "bytes": part.stat().st_size, "check": check}
        else:
            self.need_network()
            url = f"{self.src['base_url']}/{part.name}"
            digest = self.fetch(url, part, None, room)
            files[part.name] = {"url": url, "sha256": digest, "bytes": part.stat().st_size, "check": check}
        self.save()

    # ------------------------------------------------------------------ MTG-Jamendo

    def mtg(self, wanted: list[str], quality: str) -> None:
        src, m = self.src, self.manifest
        kind = audio_folder(quality)
        if m.get("quality", quality) != quality:
            raise UsageError(f"--quality {quality}: {self.folder} holds the {m['quality']} quality tars; use another "
                             f"--root for {quality}")
        audio = self.folder / kind
        tars = m.setdefault("tars", {})
        meta = self.folder / "metadata"
        q = src["quality"][quality]
        paths = self._metadata_paths(q)
        have_meta = all((meta / p).is_file() and p in m.get("metadata", {}).get("files", {}) for p in paths)

        def downloaded(nn: str) -> Path:
            return self.folder / DOWNLOADS / q["tar"].format(nn=nn)

        if have_meta and all(tars.get(n, {}).get("unpacked") for n in wanted) and audio.is_dir():
            self.summary.already_complete = True
            self.drop_archives([downloaded(n) for n in wanted])  # left by a kill after the save
            return
        m.update(quality=quality, tars_total=int(src["tars"]))
        md = m.setdefault("metadata", {"repository": "MTG/mtg-jamendo-dataset", "commit": src["commit"],
                                         "files": {}})
        pinned = f"pinned by git commit {src['commit']}; sha256 recorded at download"
        for p in paths:  # one file that fails is reported; the others, and the tars, go on
            try:
                self.fetch_small(f"{src['metadata_url']}/{p}", meta / p, md["files"], p, pinned)
                if p.endswith(".tsv"):
                    self._check_split_file(meta / p, p, md["files"])
            except (NetworkDisabled, NoSpaceError):
                raise
            except (DownloadError, DatasetCorrupt) as e:
                self.summary.failed.append(f"metadata {p}: {e}")
        self.save()
        for p in (q["sha256_tars"], q["sha256_tracks"]):
            if not (meta / p).is_file():
                why = next((f for f in self.summary.failed if f.startswith(f"metadata {p}: ")), f"metadata {p}: absent")
                raise DatasetCorrupt(f"{why}; without it no tar can be checked, so none was fetched")
        try:
            tar_sha, track_sha = _sha_list(meta / q["sha256_tars"]), _sha_list(meta / q["sha256_tracks"])
        except DatasetCorrupt:
            for p in (q["sha256_tars"], q["sha256_tracks"]):  # fetched again by the next run
                (meta / p).unlink(missing_ok=True)
                md["files"].pop(p, None)
            self.save()
            raise
        for nn in wanted:
            if tars.get(nn, {}).get("unpacked") and (audio / nn).is_dir():
                self.drop_archives([downloaded(nn)])
                continue
            name = q["tar"].format(nn=nn)
            if name not in tar_sha:
                self.summary.failed.append(f"{name}: not in {q['sha256_tars']}; skipped")
                continue
            try:
                tars[nn] = self._mtg_tar(nn, name, f"{src['audio_url']}/{kind}/{name}", tar_sha[name], track_sha,
                                         audio, q)
            except (NetworkDisabled, NoSpaceError):
                raise  # the other tars would meet the same
            except (DownloadError, ArchiveError, DatasetCorrupt) as e:
                self.summary.failed.append(str(e))
                tars.pop(nn, None)
                self.save()
                continue
            self.save()  # the manifest says unpacked before the tar goes: a kill between costs no re-download
            self.drop_archives([downloaded(nn)])

    def _check_split_file(self, path: Path, rel: str, record: dict) -> None:
        """A split file starts with the published header (a link's text or an error page does not)."""
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline().rstrip("\r\n")
        if header != self.src["split_header"]:
            path.unlink()
            record.pop(rel, None)
            raise DatasetCorrupt(f"not an MTG-Jamendo split file (its first line is {header[:60]!r}, not "
                                 f"{self.src['split_header']!r}); the file was deleted")

    def _metadata_paths(self, q: dict) -> list[str]:
        src = self.src
        splits = [f"data/splits/split-{k}/{subset}-{part}.tsv" for k in range(int(src["splits"]))
                  for subset in src["subsets"] for part in ("train", "validation", "test")]
        return [*src["metadata"], *splits, q["sha256_tars"], q["sha256_tracks"]]

    def _mtg_tar(self, nn: str, name: str, url: str, sha: str, track_sha: dict[str, str], audio: Path,
                 q: dict) -> dict:
        """Fetch tar nn (checked against the published sha256; a corrupt one is deleted and fetched once
        more), unpack it, check every track against the published list. Returns its manifest entry."""
        path = self.folder / DOWNLOADS / name
        if path.is_file() and sha256_file(path) != sha:  # left by an earlier run: check before trusting it
            path.unlink()
        if not path.is_file():
            self.need_network()
            try:
                self.fetch(url, path, sha, 1.0)
            except VerificationError:
                self.fetch(url, path, sha, 1.0)  # deleted by the check; once more, then the error stands
        members = tar_members(path, audio, name)
        expected = {k for k in track_sha if k.startswith(f"{nn}/")}
        names = {m.name for m in members if m.isfile()}
        if names - set(track_sha):
            extra = sorted(names - set(track_sha))
            raise DatasetCorrupt(f"{name}: {len(extra)} member(s) not in {q['sha256_tracks']} (e.g. {extra[0]}); "
                                 f"nothing unpacked")
        missing = sum(m.size for m in members if m.isfile() and not (audio / m.name).is_file())
        check_free_space(audio, missing, f"unpacking {name}")
        written: list[Path] = []
        try:
            for member, target in untar(path, audio, name, self.progress):
                written.append(target)
                if sha256_file(target) != track_sha[member]:
                    raise DatasetCorrupt(f"{name}: {member} does not match its sha256 in {q['sha256_tracks']}; "
                                         f"the tar's tracks were deleted")
        except BaseException:  # a failed (or interrupted) tar leaves none of its tracks for the probe to find
            for t in written:
                t.unlink(missing_ok=True)
            raise
        n = len(written)
        absent = sorted(expected - names)
        self.summary.unpacked.append(name)
        self.log(f"mtg-jamendo: {name} verified and unpacked, {n} tracks checked")
        return {"file": name, "url": url, "sha256": sha, "check": f"sha256 against {q['sha256_tars']}",
                "tracks": n, "tracks_check": f"sha256 of every track against {q['sha256_tracks']}",
                "tracks_listed_but_absent": absent, "unpacked": True, "archive_kept": self.keep}


def _check_mtt_annotations(path: Path, clips: int) -> None:
    """annotations_final.csv is tab-separated with clip_id first and mp3_path last (an HTML error page is
    not), every line has the header's columns and there are `clips` of them: MTT publishes no checksum,
    so a transfer cut short (at a line's end or within one) is found here. A bad file is deleted."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    header = lines[0].split("\t") if lines else []
    rows = [line for line in lines[1:] if line.strip()]
    problem = None
    if not header or header[0].strip('"') != "clip_id" or header[-1].strip('"') != "mp3_path":
        problem = "the header does not start with clip_id and end with mp3_path, tab-separated"
    elif short := next((i for i, line in enumerate(rows, 2) if line.count("\t") != len(header) - 1), None):
        problem = (f"line {short} has {rows[short - 2].count(chr(9)) + 1} columns, the header {len(header)}: "
                   f"a truncated download?")
    elif len(rows) != clips:
        problem = f"{len(rows)} clips, MagnaTagATune has {clips}: a truncated download?"
    if problem:
        path.unlink()
        raise DatasetCorrupt(f"{path.name}: not MagnaTagATune's annotations ({problem}); the file was deleted, "
                             f"run the download again")


def _sha_list(path: Path) -> dict[str, str]:
    """A published checksum list ('<sha256> <name>' per line) as {name: sha256}."""
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        digest, _, name = line.strip().partition(" ")
        if len(digest) == 64 and all(c in "0123456789abcdefABCDEF" for c in digest) and name.strip():
            out[name.strip()] = digest.lower()
    if not out:
        raise DatasetCorrupt(f"{path}: no '<sha256> <name>' line, not a checksum list; it was deleted, run the "
                             f"download again")
    return out


__all__ = ["DatasetCorrupt", "DownloadSummary", "default_root", "download_dataset", "dataset_info",
           "list_datasets", "parse_tars", "sources"]
