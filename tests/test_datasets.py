"""`maest datasets`: fetch, verify, unpack and find MagnaTagATune and MTG-Jamendo, against loopback
mirrors of their sites (tests/conftest.py: mtt_mirror, mtg_mirror; nothing leaves 127.0.0.1)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import maest_cli.io.download as download
from maest_cli.cli.app import app
from maest_cli.datasets.archives import UnsafeMember
from maest_cli.datasets.fetch import DatasetCorrupt, NetworkDisabled, download_dataset, parse_tars
from maest_cli.datasets.layout import DatasetMissing, default_root, locate
from maest_cli.errors import UsageError

pytestmark = pytest.mark.usefixtures("loopback_only")
runner = CliRunner()
TAR14 = "/mtg-jamendo/audio-low/raw_30s_audio-low-14.tar"


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    """Retries back off without sleeping; the waits asked for are kept in the list returned."""
    waits = []
    monkeypatch.setattr(download.time, "sleep", waits.append)
    return waits


def fetched(server) -> list[str]:
    return [path for path, _ in server.requests]


# ---------------------------------------------------------------- MagnaTagATune

def test_mtt_download_joins_checks_unpacks_and_is_found(mtt_mirror):
    s = download_dataset("mtt", progress=False)
    loc = locate("mtt")
    assert s.complete and loc.complete and not s.failed and loc.root == default_root() / "mtt"
    assert loc.annotations_root == loc.root and (loc.root / "annotations_final.csv").is_file()
    clips = sorted(p.relative_to(loc.audio_root).as_posix() for p in loc.audio_root.rglob("*.mp3"))
    ann = (loc.root / "annotations_final.csv").read_text().splitlines()[1:]
    assert clips == sorted(line.split("\t")[-1].strip('"') for line in ann)
    assert {c.split("/")[0] for c in clips} == set("0123456789abcdef")
    m = json.loads((loc.root / "manifest.json").read_text())
    for name in ("annotations_final.csv", "mp3.zip.001", "mp3.zip.002", "mp3.zip.003"):  # what was fetched
        assert m["files"][name]["sha256"] == hashlib.sha256(mtt_mirror.files[f"/mtt/{name}"]).hexdigest()
        assert "no checksums" in m["files"][name]["check"]
    assert m["audio"]["members"] == len(clips) == m["audio"]["annotated_clips_with_audio"] == 33
    assert "CRC-32" in m["audio"]["check"]
    assert m["tool"]["maest-cli"] and "Noncommercial-Share Alike 3.0" in m["licence"]
    assert not (loc.root / "downloads" / "mp3.zip.001").exists()  # unpacked and checked: the parts go

    before = len(mtt_mirror.requests)  # a rerun of a complete dataset does nothing but say so
    again = download_dataset("mtt", progress=False)
    assert again.already_complete and len(mtt_mirror.requests) == before and again.coverage == s.coverage


def test_mtt_zip_without_some_clips_is_partial(http_server, tmp_path, monkeypatch):
    from conftest import mtt_mirror_files, serve_mirror

    files = mtt_mirror_files()
    clips = [line.split("\t")[-1].strip('"') for line in files["/mtt/annotations_final.csv"].decode().splitlines()[1:]]
    serve_mirror(http_server, mtt_mirror_files(omit=tuple(clips[:2]), empty=(clips[2],)), tmp_path, monkeypatch)
    r = runner.invoke(app, ["datasets", "download", "mtt"])
    assert r.exit_code == 0, r.output
    assert "mtt: partial under " in r.stdout and "(31 of the 33 annotated clips of mp3.zip.001-003 on disk)" in r.stdout
    loc = locate("mtt")  # the empty clip is a file on disk: it counts as present
    assert not loc.complete and (loc.coverage.present, loc.coverage.total) == (31, 33)
    assert json.loads(runner.invoke(app, ["datasets", "list", "--json"]).stdout)[0]["state"] == "partial"


@pytest.mark.parametrize("cut", ["line", "row"])
def test_truncated_annotations_are_refused_and_fetched_again(http_server, tmp_path, monkeypatch, cut):
    from conftest import mtt_mirror_files, serve_mirror

    files = mtt_mirror_files()
    whole = files["/mtt/annotations_final.csv"]
    lines = whole.splitlines(keepends=True)
    files["/mtt/annotations_final.csv"] = (b"".join(lines[:20]) + lines[20][:100] if cut == "line"
                                           else b"".join(lines[:20]))  # the server's length is the cut one
    serve_mirror(http_server, files, tmp_path, monkeypatch, mtt_clips=len(lines) - 1)
    with pytest.raises(DatasetCorrupt) as e:
        download_dataset("mtt", progress=False)
    assert str(e.value) == ("annotations_final.csv: not MagnaTagATune's annotations ("
                            + ("line 21 has 25 columns, the header 190: a truncated download?" if cut == "line" else
                               "19 clips, MagnaTagATune has 33: a truncated download?")
                            + "); the file was deleted, run the download again")
    assert not (default_root() / "mtt" / "annotations_final.csv").exists()
    assert not any("mp3.zip" in p for p in fetched(http_server))  # nothing else fetched on a bad file
    http_server.files["/mtt/annotations_final.csv"] = whole
    assert download_dataset("mtt", progress=False).complete


def test_interrupted_download_resumes_in_the_run_and_on_the_next(mtt_mirror, no_waiting):
    mtt_mirror.cut_after = 10_000  # the first transfer drops: retried at once from its .part
    download_dataset("mtt", progress=False)
    assert ("/mtt/annotations_final.csv", "bytes=10000-") in mtt_mirror.requests and no_waiting == [2.0]

    shutil.rmtree(default_root())
    mtt_mirror.requests.clear()
    mtt_mirror.cut_after = 8_000  # dropped, then the server is busy for longer than the retries last
    mtt_mirror.fail["/mtt/annotations_final.csv"] = [0, 503, 503, 503]
    with pytest.raises(download.TransientDownloadError, match="503"):
        download_dataset("mtt", progress=False)
    part = default_root() / "mtt" / "annotations_final.csv.part"
    assert part.stat().st_size == 8_000 and no_waiting == [2.0, 2.0, 4.0, 8.0]
    s = download_dataset("mtt", progress=False)  # the next run resumes where the last stopped
    assert s.complete and mtt_mirror.requests[-4] == ("/mtt/annotations_final.csv", "bytes=8000-")


def test_corrupt_zip_part_is_fetched_again_once_then_refused(mtt_mirror):
    mtt_mirror.corrupt_once.add("/mtt/mp3.zip.002")  # MTT publishes no hash: the members' CRC finds it
    s = download_dataset("mtt", progress=False)
    assert s.complete and fetched(mtt_mirror).count("/mtt/mp3.zip.002") == 2

    shutil.rmtree(default_root())
    blob = bytearray(mtt_mirror.files["/mtt/mp3.zip.002"])
    blob[len(blob) // 2] ^= 0xFF
    mtt_mirror.files["/mtt/mp3.zip.002"] = bytes(blob)  # corrupt for good
    with pytest.raises(DatasetCorrupt, match="fetched twice") as e:
        download_dataset("mtt", progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(DatasetMissing, match="incomplete; run `maest datasets download mtt`"):
        locate("mtt")  # what failed its check never reaches the probe


@pytest.mark.parametrize("member", ["../evil.mp3", "/tmp/evil.mp3", "0/../../evil.mp3"])
def test_zip_member_outside_the_root_is_refused(http_server, tmp_path, monkeypatch, member):
    from conftest import mtt_mirror_files, serve_mirror

    serve_mirror(http_server, mtt_mirror_files(extra_members={member: b"x"}), tmp_path, monkeypatch)
    dl = default_root() / "mtt" / "downloads"
    with pytest.raises(UnsafeMember, match="would land outside") as e:
        download_dataset("mtt", progress=False)
    assert str(e.value).endswith(f"nothing unpacked; the parts stay in {dl} (delete that folder to fetch them again)")
    assert not list(tmp_path.rglob("evil.mp3")) and not (default_root() / "mtt" / "audio").exists()


def test_free_disk_check_refuses_before_the_first_part(mtt_mirror, monkeypatch):
    """Room for one part and its unpacking (what a per-part check asked) is not enough: the disk
    must hold every part and the unpacked clips, and is refused before the first part's first byte."""
    import io
    import zipfile

    parts = [mtt_mirror.files[f"/mtt/mp3.zip.00{i}"] for i in (1, 2, 3)]
    members = sum(i.file_size for i in zipfile.ZipFile(io.BytesIO(b"".join(parts))).infolist())
    usage = shutil.disk_usage("/")
    free = int(2.5 * len(parts[0]))  # > part 1 twice over, < the three parts plus the unpacked clips
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: usage._replace(free=free))
    r = runner.invoke(app, ["datasets", "download", "mtt"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("maest: error:")]
    assert len(errors) == 1 and errors[0].startswith("maest: error: mp3.zip.001: needs "), errors
    need = float(errors[0].split("needs ")[1].split(" kB")[0]) * 1000
    assert need >= sum(map(len, parts)) + members
    assert errors[0].endswith(f"{free / 1000:.1f} kB available; free some space or put the data on another disk")
    assert not list((default_root() / "mtt").rglob("mp3.zip*"))  # refused before its first byte
    assert "/mtt/mp3.zip.002" not in fetched(mtt_mirror)


def test_free_disk_check_before_unpacking(mtt_mirror, monkeypatch):
    """Parts already on disk (an earlier run stopped before unpacking): the unpack itself is checked."""
    import maest_cli.datasets.archives as archives

    real = archives.unzip_parts
    monkeypatch.setattr("maest_cli.datasets.fetch.unzip_parts", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        download_dataset("mtt", progress=False)
    monkeypatch.setattr("maest_cli.datasets.fetch.unzip_parts", real)
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    before = len(mtt_mirror.requests)
    with pytest.raises(download.NoSpaceError, match=r"^unpacking mp3.zip.001-003: needs 17\d\.\d kB free in "):
        download_dataset("mtt", progress=False)
    assert len(mtt_mirror.requests) == before and not (default_root() / "mtt" / "audio").exists()
    assert len(list((default_root() / "mtt" / "downloads").glob("mp3.zip.00?"))) == 3  # kept for the next run


def test_offline_and_missing_say_which_command_fixes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MAEST_DATA", str(tmp_path / "data"))
    with pytest.raises(DatasetMissing) as e:
        locate("mtt")
    assert str(e.value) == f"mtt: not found under {tmp_path / 'data'}; run `maest datasets download mtt`"
    assert e.value.exit_code == 2
    with pytest.raises(DatasetMissing, match=f"run `maest datasets download mtg-jamendo --root {tmp_path}`"):
        locate("mtg-jamendo-genre", tmp_path)
    spaced = tmp_path / "my data"
    with pytest.raises(DatasetMissing) as e:
        locate("mtt", spaced)
    assert str(e.value).endswith(f"run `maest datasets download mtt --root '{spaced}'`")
    with pytest.raises(NetworkDisabled, match="MAEST_OFFLINE is set; unset it and run `maest datasets download mtt`"):
        download_dataset("mtt", progress=False)  # conftest sets MAEST_OFFLINE=1


# ---------------------------------------------------------------- MTG-Jamendo

def test_mtg_subset_is_verified_found_with_its_coverage_and_reruns_do_nothing(mtg_mirror):
    from maest_cli.probing.data import load_annotations

    s = download_dataset("mtg-jamendo", tars="14,17,20", progress=False)
    loc = locate("mtg-jamendo-genre")
    assert not s.failed and not loc.complete and loc.coverage.parts == ("14", "17", "20")
    assert str(loc.coverage) == "tars 14,17,20 of 0-99 (3/100, low quality)" == s.coverage
    assert sorted(p.relative_to(loc.audio_root).as_posix() for p in loc.audio_root.rglob("*.mp3")) == \
        ["14/214.low.mp3", "17/217.low.mp3", "20/220.low.mp3"]
    ann = load_annotations("mtg-jamendo-genre", loc.annotations_root)  # the probe reads the metadata as is
    assert "14/214.mp3" in ann.paths
    m = loc.manifest
    assert m["metadata"]["commit"] == "1b4fa8c32e076c73b5175c1703ae805b4109309d"
    assert m["tars"]["14"]["tracks"] == 1 and "raw_30s_audio-low_sha256_tracks.txt" in m["tars"]["14"]["tracks_check"]
    assert m["tars"]["14"]["sha256"] == hashlib.sha256(mtg_mirror.files[TAR14]).hexdigest()

    before = len(mtg_mirror.requests)
    assert download_dataset("mtg-jamendo", tars="14,17", progress=False).already_complete
    assert len(mtg_mirror.requests) == before
    more = download_dataset("mtg-jamendo", tars="14-23", progress=False)  # only the new tars are fetched
    assert fetched(mtg_mirror)[before:] == [f"/mtg-jamendo/audio-low/raw_30s_audio-low-{n}.tar"
                                            for n in (15, 16, 18, 19, 21, 22, 23)]
    assert not more.failed and locate("mtg-jamendo").coverage.parts == tuple(f"{n}" for n in range(14, 24))
    assert locate("mtg-jamendo").manifest["tars"]["15"]["tracks"] == 0  # this mirror's tar 15 holds no track


def test_corrupt_tar_is_refused_fetched_again_and_never_unpacked(mtg_mirror):
    mtg_mirror.corrupt_once.add(TAR14)
    s = download_dataset("mtg-jamendo", tars="14", progress=False)
    assert not s.failed and fetched(mtg_mirror).count(TAR14) == 2 and locate("mtg-jamendo").coverage.present == 1

    shutil.rmtree(default_root())
    tar = bytearray(mtg_mirror.files[TAR14])
    tar[len(tar) // 2] ^= 0xFF
    mtg_mirror.files[TAR14] = bytes(tar)  # corrupt for good
    r = runner.invoke(app, ["datasets", "download", "mtg-jamendo", "--tars", "14,17"])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("maest: error:")]
    assert len(errors) == 1 and "raw_30s_audio-low-14.tar: expected sha256" in errors[0]
    loc = locate("mtg-jamendo")
    assert loc.coverage.parts == ("17",) and not (loc.audio_root / "14").exists()
    assert not list((loc.root / "downloads").glob("*14.tar*"))


@pytest.mark.parametrize("member", ["../../evil.low.mp3", "/tmp/evil.low.mp3"])
def test_tar_member_outside_the_root_is_refused(http_server, tmp_path, monkeypatch, member):
    from conftest import mtg_mirror_files, serve_mirror

    serve_mirror(http_server, mtg_mirror_files(extra_members={"14": {member: b"x"}}), tmp_path, monkeypatch)
    s = download_dataset("mtg-jamendo", tars="14", progress=False)
    assert len(s.failed) == 1 and "raw_30s_audio-low-14.tar" in s.failed[0], s.failed
    assert not list(tmp_path.rglob("evil.low.mp3")) and not (default_root() / "mtg-jamendo" / "audio-low" / "14").exists()


def test_links_in_archives_are_refused(http_server, tmp_path, monkeypatch):
    """A symbolic link (to anywhere) or a hard link member refuses the archive: nothing of it is unpacked."""
    import stat
    import tarfile
    import zipfile

    from conftest import mtg_mirror_files, mtt_mirror_files, serve_mirror

    link = zipfile.ZipInfo("0/link.mp3")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    serve_mirror(http_server, mtt_mirror_files(extra_members={link: b"/etc/passwd"}), tmp_path, monkeypatch)
    with pytest.raises(UnsafeMember, match="member '0/link.mp3' is a symbolic link; nothing unpacked"):
        download_dataset("mtt", progress=False)
    assert not (default_root() / "mtt" / "audio").exists()

    sym, hard = tarfile.TarInfo("14/sym.low.mp3"), tarfile.TarInfo("17/hard.low.mp3")
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard.type, hard.linkname = tarfile.LNKTYPE, "17/217.low.mp3"
    serve_mirror(http_server, mtg_mirror_files(extra_members={"14": {sym.name: sym}, "17": {hard.name: hard}}),
                 tmp_path, monkeypatch)
    s = download_dataset("mtg-jamendo", tars="14,17,20", progress=False)
    assert s.failed == [f"raw_30s_audio-low-{nn}.tar: member '{m}' is a link or device, not a file; nothing unpacked"
                        for nn, m in (("14", sym.name), ("17", hard.name))]
    loc = locate("mtg-jamendo")
    assert loc.coverage.parts == ("20",) and not (loc.audio_root / "14").exists() and not (loc.audio_root / "17").exists()


def test_track_that_does_not_match_its_list_is_deleted(http_server, tmp_path, monkeypatch):
    from conftest import mtg_mirror_files, serve_mirror

    files = mtg_mirror_files()
    sums = "/mtg-jamendo/metadata/data/download/raw_30s_audio-low_sha256_tracks.txt"
    files[sums] = files[sums].replace(b" 14/214.low.mp3", b" 14/999.low.mp3")  # the tar's track is not listed
    tars = "/mtg-jamendo/metadata/data/download/raw_30s_audio-low_sha256_tars.txt"
    files[tars] = b"".join(line for line in files[tars].splitlines(keepends=True) if b"-20.tar" not in line)
    serve_mirror(http_server, files, tmp_path, monkeypatch)
    s = download_dataset("mtg-jamendo", tars="14,17,20", progress=False)
    assert s.failed == ["raw_30s_audio-low-14.tar: 1 member(s) not in data/download/raw_30s_audio-low_sha256_tracks"
                        ".txt (e.g. 14/214.low.mp3); nothing unpacked",
                        "raw_30s_audio-low-20.tar: not in data/download/raw_30s_audio-low_sha256_tars.txt; skipped"]
    assert locate("mtg-jamendo").coverage.parts == ("17",)


def test_archives_go_only_after_the_manifest_says_unpacked(mtt_mirror, mtg_mirror, monkeypatch):
    """A kill between unpacking and saving the manifest leaves the verified tar to reuse, not 1.6 GB to
    fetch again; a finished download whose archives a kill left behind deletes them on the rerun."""
    import maest_cli.datasets.fetch as fetch

    real = fetch._Job._mtg_tar

    def unpacked_then_killed(self, *a, **k):
        entry = real(self, *a, **k)
        self.save = lambda: (_ for _ in ()).throw(KeyboardInterrupt())
        return entry

    monkeypatch.setattr(fetch._Job, "_mtg_tar", unpacked_then_killed)
    with pytest.raises(KeyboardInterrupt):
        download_dataset("mtg-jamendo", tars="14", progress=False)
    tar = default_root() / "mtg-jamendo" / "downloads" / "raw_30s_audio-low-14.tar"
    assert tar.is_file()
    monkeypatch.setattr(fetch._Job, "_mtg_tar", real)
    before = len(mtg_mirror.requests)
    s = download_dataset("mtg-jamendo", tars="14", progress=False)
    assert s.unpacked == ["raw_30s_audio-low-14.tar"] and len(mtg_mirror.requests) == before and not tar.exists()

    download_dataset("mtt", progress=False, keep_archives=True)  # parts left as a kill after the save leaves them
    parts = sorted((default_root() / "mtt" / "downloads").glob("mp3.zip.00?"))
    assert len(parts) == 3
    assert download_dataset("mtt", progress=False).already_complete and not any(p.exists() for p in parts)
    assert download_dataset("mtg-jamendo", tars="17", progress=False, keep_archives=True).unpacked
    tar17 = tar.with_name("raw_30s_audio-low-17.tar")
    assert tar17.is_file() and download_dataset("mtg-jamendo", tars="17", progress=False).already_complete
    assert not tar17.exists()


def test_metadata_is_what_the_probe_reads_each_file_checked_a_failure_named(http_server, tmp_path, monkeypatch):
    from conftest import mtg_mirror_files, serve_mirror

    files = mtg_mirror_files()
    gone = "data/splits/split-3/autotagging_moodtheme-test.tsv"
    link = "data/splits/split-2/autotagging_genre-train.tsv"
    del files[f"/mtg-jamendo/metadata/{gone}"]
    files[f"/mtg-jamendo/metadata/{link}"] = b"../autotagging_genre-train.tsv"  # a symbolic link's raw text
    serve_mirror(http_server, files, tmp_path, monkeypatch)
    r = runner.invoke(app, ["datasets", "download", "mtg-jamendo", "--tars", "14"])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("maest: error:")]
    assert errors == [
        f"maest: error: metadata {link}: not an MTG-Jamendo split file (its first line is "
        "'../autotagging_genre-train.tsv', not 'TRACK_ID\\tARTIST_ID\\tALBUM_ID\\tPATH\\tDURATION\\tTAGS'); "
        "the file was deleted",
        f"maest: error: metadata {gone}: {http_server.url}/mtg-jamendo/metadata/{gone}: HTTP 404 Not Found"]
    loc = locate("mtg-jamendo")  # the other files and the tar went on
    assert loc.coverage.parts == ("14",) and not (loc.annotations_root / link).exists()
    asked = {p.removeprefix("/mtg-jamendo/metadata/") for p, _ in http_server.requests if "/metadata/" in p}
    assert len(asked) == 63 and "audio_licenses.txt" in asked  # 4 tasks x 5 splits x 3, 2 sha256 lists, licences
    assert not any(p.startswith("data/autotagging") or "/autotagging-" in p for p in asked)
    files[f"/mtg-jamendo/metadata/{gone}"] = files[f"/mtg-jamendo/metadata/{gone.replace('-3/', '-2/')}"]
    files[f"/mtg-jamendo/metadata/{link}"] = files[f"/mtg-jamendo/metadata/{link.replace('-2/', '-1/')}"]
    http_server.files.update(files)
    before = len(http_server.requests)
    s = download_dataset("mtg-jamendo", tars="14", progress=False)  # the rerun fetches only the two
    assert not s.failed and sorted(p for p, _ in http_server.requests[before:]) == sorted(
        f"/mtg-jamendo/metadata/{p}" for p in (gone, link))

    sums = "data/download/raw_30s_audio-low_sha256_tars.txt"  # without a checksum list no tar is fetched
    shutil.rmtree(default_root())
    del http_server.files[f"/mtg-jamendo/metadata/{sums}"]
    with pytest.raises(DatasetCorrupt) as e:
        download_dataset("mtg-jamendo", tars="14", progress=False)
    assert str(e.value) == (f"metadata {sums}: {http_server.url}/mtg-jamendo/metadata/{sums}: HTTP 404 Not Found; "
                            f"without it no tar can be checked, so none was fetched")
    assert not any(p.endswith(".tar") for p, _ in http_server.requests[before:])


def test_a_checksum_list_that_is_not_one_is_refused_and_fetched_again(mtg_mirror):
    sums = "/mtg-jamendo/metadata/data/download/raw_30s_audio-low_sha256_tracks.txt"
    good = mtg_mirror.files[sums]
    mtg_mirror.files[sums] = b"../raw_30s_audio-low_sha256_tracks.txt"  # a symbolic link's raw text
    with pytest.raises(DatasetCorrupt, match="raw_30s_audio-low_sha256_tracks.txt: no '<sha256> <name>' line"):
        download_dataset("mtg-jamendo", tars="14", progress=False)
    assert not any(p.endswith(".tar") for p in fetched(mtg_mirror))
    mtg_mirror.files[sums] = good
    s = download_dataset("mtg-jamendo", tars="14", progress=False)
    assert not s.failed and fetched(mtg_mirror).count(sums) == 2 and locate("mtg-jamendo").coverage.parts == ("14",)


def test_parse_tars_and_quality():
    assert parse_tars("0-2,5,7-8", 100) == ["00", "01", "02", "05", "07", "08"]
    assert parse_tars(None, 3) == ["00", "01", "02"] and parse_tars("9", 100) == ["09"]
    for bad in ("0-100", "5-3", "x", "1,,2", "-1"):
        with pytest.raises(UsageError, match=f"--tars {bad}"):
            parse_tars(bad, 100)
    with pytest.raises(UsageError, match="--tars: only mtg-jamendo"):
        download_dataset("mtt", tars="0-9")
    with pytest.raises(UsageError, match="--quality medium"):
        download_dataset("mtg-jamendo", quality="medium")


# ---------------------------------------------------------------- the commands

def test_commands_download_info_list(mtt_mirror, tmp_path):
    root = tmp_path / "elsewhere"
    r = runner.invoke(app, ["datasets", "download", "mtt", "--root", str(root)])
    assert r.exit_code == 0, r.output
    assert f"mtt: complete under {root / 'mtt'}" in r.stdout and "licence: " in r.stdout
    assert "Noncommercial-Share Alike 3.0" in r.stdout
    assert "mtt: mp3.zip.001-003 unpacked, 33 members CRC-checked, 33 of 33 annotated clips have audio" in r.stderr
    r = runner.invoke(app, ["datasets", "download", "mtt", "--root", str(root)])
    assert r.exit_code == 0 and "already downloaded" in r.stdout and "nothing to do" in r.stdout
    info = json.loads(runner.invoke(app, ["datasets", "info", "mtt", "--root", str(root)]).stdout)
    assert info["state"] == "complete" and info["audio_root"] == str(root / "mtt" / "audio")
    assert "manifest" not in info and info["manifest_summary"]["updated"]
    info = json.loads(runner.invoke(app, ["datasets", "info", "mtg-jamendo", "--root", str(root)]).stdout)
    assert info["state"] == "missing" and f"maest datasets download mtg-jamendo --root {root}" in info["fix"]
    assert "CC BY-NC-SA 4.0" in info["licence"] and "audio_licenses.txt" in info["licence"]
    rows = json.loads(runner.invoke(app, ["datasets", "list", "--root", str(root), "--json"]).stdout)
    assert [(r["name"], r["state"]) for r in rows] == [("mtt", "complete"), ("mtg-jamendo", "missing")]
    table = runner.invoke(app, ["datasets", "list", "--root", str(root)])
    assert table.exit_code == 0 and "MagnaTagATune" in table.stdout and "156 GB" in table.stdout
    assert Path(rows[0]["folder"]) == root / "mtt"


def test_track_that_fails_its_sha256_takes_its_tar_out(http_server, tmp_path, monkeypatch):
    from conftest import mtg_mirror_files, serve_mirror

    files = mtg_mirror_files()
    sums = "/mtg-jamendo/metadata/data/download/raw_30s_audio-low_sha256_tracks.txt"
    lines = files[sums].decode().splitlines(keepends=True)
    files[sums] = "".join("0" * 64 + line[64:] if " 14/" in line else line for line in lines).encode()
    serve_mirror(http_server, files, tmp_path, monkeypatch)
    s = download_dataset("mtg-jamendo", tars="14,17", progress=False)
    assert s.failed == ["raw_30s_audio-low-14.tar: 14/214.low.mp3 does not match its sha256 in "
                        "data/download/raw_30s_audio-low_sha256_tracks.txt; the tar's tracks were deleted"]
    loc = locate("mtg-jamendo")
    assert loc.coverage.parts == ("17",) and not list((loc.audio_root / "14").glob("*.mp3"))


def test_interrupted_unpack_is_redone_without_fetching_again(mtt_mirror, mtg_mirror, monkeypatch):
    import maest_cli.datasets.archives as archives

    real, calls = archives._write_member, []

    def dies_at_the_tenth(*a, **k):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(archives, "_write_member", dies_at_the_tenth)
    with pytest.raises(KeyboardInterrupt):
        download_dataset("mtt", progress=False)
    with pytest.raises(DatasetMissing, match="incomplete"):
        locate("mtt")
    monkeypatch.setattr(archives, "_write_member", real)
    before = len(mtt_mirror.requests)
    s = download_dataset("mtt", progress=False)
    assert s.complete and len(mtt_mirror.requests) == before and s.unpacked == ["mp3.zip.001-003"]

    monkeypatch.setattr(archives, "_write_member", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        download_dataset("mtg-jamendo", tars="14", progress=False)
    monkeypatch.setattr(archives, "_write_member", real)
    before = len(mtg_mirror.requests)
    s = download_dataset("mtg-jamendo", tars="14", progress=False)  # the verified tar waited in downloads/
    assert s.unpacked == ["raw_30s_audio-low-14.tar"] and len(mtg_mirror.requests) == before
    assert locate("mtg-jamendo").coverage.parts == ("14",)
