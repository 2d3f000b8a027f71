"""Shared fixtures: generated audio and tiny random-weight models (no downloads, no ../shared)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from maest_cli.models.engines import no_telemetry

no_telemetry()  # before any test imports openvino: tests never send its usage events


@pytest.fixture(autouse=True)
def _no_network_or_user_cache(tmp_path_factory, monkeypatch):
    """Tests never download and never touch the user's model cache."""
    monkeypatch.setenv("MAEST_OFFLINE", "1")
    monkeypatch.setenv("MAEST_CACHE", str(tmp_path_factory.mktemp("maest-cache")))


def tone_mix(seconds: float, sr: int = 44100, seed: int = 0, channels: int = 2) -> np.ndarray:
    """A few harmonic tones plus a little noise: audio that exercises every mel band."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = sum(0.15 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in rng.uniform(80, 5000, 4))
    x = x + 0.02 * rng.standard_normal(len(t))
    stereo = np.stack([x, 0.8 * x[::-1].copy()], 1)[:, :channels]
    return stereo.astype(np.float32)


def write_audio(path, seconds: float, sr: int = 44100, seed: int = 0, channels: int = 2) -> str:
    """Write generated audio in the format its extension names (wav, flac, ogg, opus, mp3)."""
    fmt = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS"),
           ".opus": ("OGG", "OPUS"), ".mp3": ("MP3", "MPEG_LAYER_III")}[str(path)[str(path).rfind("."):]]
    if fmt[1] == "OPUS":
        sr = 48000
    sf.write(str(path), tone_mix(seconds, sr, seed, channels), sr, format=fmt[0], subtype=fmt[1])
    return str(path)


@pytest.fixture
def audio_file(tmp_path):
    """Factory: audio_file('x.mp3', seconds=3.0) -> path of a generated file."""
    def make(name: str, seconds: float = 3.0, **kw) -> str:
        return write_audio(tmp_path / name, seconds, **kw)
    return make


@pytest.fixture
def tiny_model_file(tmp_path):
    """A tiny random MAEST (316-frame segments, 10 labels) in our safetensors format."""
    import torch

    from maest_cli.models.checkpoints import save_checkpoint
    from maest_cli.models.maest import MAEST, tiny_config

    torch.manual_seed(0)
    model = MAEST(tiny_config(frames=316, n_classes=10))
    return str(save_checkpoint(tmp_path / "tiny.safetensors", model, labels=[f"tag{i}" for i in range(10)],
                               extra={"name": "tiny-test"}))


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread on a shared machine; restored afterwards.
    Modules use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- a loopback HTTP server

@pytest.fixture
def loopback_only(monkeypatch):
    """Any connection or name lookup other than 127.0.0.1 fails the test instead of leaving the machine."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if isinstance(address, tuple) and address[0] != "127.0.0.1":
            raise AssertionError(f"a test tried to reach {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kw):
        if host != "127.0.0.1":
            raise AssertionError(f"a test tried to look up {host}")
        return real_getaddrinfo(host, *args, **kw)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)



class Server:
    """Serves `files` on 127.0.0.1 with Range support. `cut_after` drops the connection
    mid-transfer once; `ignore_range` answers 200 with the whole body to a Range request;
    `range_total` sends "Content-Range: bytes */N" with a 416; `fail[path]` is a list of HTTP
    statuses answered one per request (0: serve this one) before the file is served as usual; a path in `corrupt_once` is
    served once with one byte flipped. Stops itself after 120 s."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_after: int | None = None
        self.ignore_range = False
        self.range_total = True
        self.fail: dict[str, list[int]] = {}
        self.corrupt_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = None if srv.ignore_range else self.headers.get("Range")
                srv.requests.append((self.path, self.headers.get("Range")))
                status = srv.fail[self.path].pop(0) if srv.fail.get(self.path) else 0
                if status:
                    self.send_error(status)
                    return
                body = srv.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if self.path in srv.corrupt_once:
                    srv.corrupt_once.discard(self.path)
                    mid = len(body) // 2
                    body = body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1:]
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(body):
                    self.send_response(416)
                    if srv.range_total:
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                chunk = body[start:]
                if srv.cut_after is not None:
                    chunk, srv.cut_after = chunk[: srv.cut_after], None
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(chunk)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.watchdog = threading.Timer(120, self.httpd.shutdown)
        self.watchdog.daemon = True
        self.watchdog.start()

    def stop(self):
        self.watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server():
    s = Server()
    yield s
    s.stop()


# ---------------------------------------------------------------- dataset mirrors (maest datasets download)

PROBE_FIXTURES = Path(__file__).parent / "fixtures" / "probe"


@functools.cache
def clip_mp3(seconds: float, sr: int, seed: int) -> bytes:
    """A generated mono mp3 clip (made once per process: mirrors are built by many tests)."""
    buf = io.BytesIO()
    sf.write(buf, tone_mix(seconds, sr, seed, channels=1), sr, format="MP3", subtype="MPEG_LAYER_III")
    return buf.getvalue()


def mtt_mirror_files(seconds: float = 1.0, empty: tuple[str, ...] = (),
                     extra_members: dict[str, bytes] | None = None, omit: tuple[str, ...] = ()) -> dict[str, bytes]:
    """MagnaTagATune as its site serves it, at small size: {URL path: bytes} for
    /mtt/annotations_final.csv (tests/fixtures/probe/mtt's 33 clips: real columns, folders 0-f)
    and /mtt/mp3.zip.001-003 (one zip of 16 kHz mono mp3s at each mp3_path, cut in three).
    `empty`: mp3_paths stored as zero-byte files (as MTT ships three); `extra_members`: more zip members;
    `omit`: mp3_paths left out of the zip. A key of `extra_members` may be a ZipInfo (a link, say)."""
    ann = (PROBE_FIXTURES / "mtt" / "annotations_final.csv").read_bytes()
    paths = [line.split("\t")[-1].strip('"') for line in ann.decode().splitlines()[1:] if line.strip()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, p in enumerate(paths):
            if p in omit:
                continue
            if p in empty:
                zf.writestr(p, b"")
                continue
            zf.writestr(p, clip_mp3(seconds, 16000, i))
        for name, data in (extra_members or {}).items():
            zf.writestr(name, data)
    blob = buf.getvalue()
    a, b = len(blob) // 3, 2 * len(blob) // 3
    return {"/mtt/annotations_final.csv": ann, "/mtt/mp3.zip.001": blob[:a], "/mtt/mp3.zip.002": blob[a:b],
            "/mtt/mp3.zip.003": blob[b:]}


def mtg_mirror_files(seconds: float = 1.0, quality: str = "low",
                     extra_members: dict[str, dict[str, bytes]] | None = None) -> dict[str, bytes]:
    """MTG-Jamendo as its repository (at the pinned commit) and its CDN serve it, at small size:
    every metadata file `maest datasets download` fetches under /mtg-jamendo/metadata/ (the split
    files of tests/fixtures/probe/mtg-jamendo where they exist, header-only files elsewhere), and
    the 100 tars /mtg-jamendo/audio-low/raw_30s_audio-low-NN.tar, each holding NN/ and the
    NN/ID.low.mp3 of the 29 tracks those split files name (one each in 14, 17, ..., 98; the
    other tars hold only their folder), with both sha256 lists.
    `extra_members`: {NN: {member name: bytes or a TarInfo (a link)}} added to tar NN, and not listed."""
    from maest_cli.datasets.fetch import sources

    cfg = sources()["mtg-jamendo"]
    q = cfg["quality"][quality]
    header = b"TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS\r\n"
    meta: dict[str, bytes] = {}
    splits = [f"data/splits/split-{k}/{s}-{part}.tsv" for k in range(cfg["splits"]) for s in cfg["subsets"]
              for part in ("train", "validation", "test")]
    for rel in [*cfg["metadata"], *splits]:
        fix = PROBE_FIXTURES / "mtg-jamendo" / rel
        meta[rel] = fix.read_bytes() if fix.is_file() else (header if rel.endswith(".tsv") else b"licences\n")
    tracks = sorted({line.split("\t")[3] for rel in splits if (PROBE_FIXTURES / "mtg-jamendo" / rel).is_file()
                     for line in (PROBE_FIXTURES / "mtg-jamendo" / rel).read_text().splitlines()[1:] if line.strip()})
    suffix = ".low.mp3" if quality == "low" else ".mp3"
    by_folder: dict[str, dict[str, bytes]] = {}
    for i, t in enumerate(tracks):
        by_folder.setdefault(t.split("/")[0], {})[t.removesuffix(".mp3") + suffix] = clip_mp3(seconds, 44100, 100 + i)
    files, tar_lines, track_lines = {}, [], []
    for nn in (f"{k:02d}" for k in range(cfg["tars"])):  # every tar, as upstream: most hold no fixture track here
        members = by_folder.get(nn, {})
        for name, data in members.items():
            track_lines.append(f"{hashlib.sha256(data).hexdigest()} {name}\n")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            d = tarfile.TarInfo(nn)
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(d)
            for name, data in {**members, **(extra_members or {}).get(nn, {})}.items():
                if isinstance(data, tarfile.TarInfo):  # a link or a device, as given
                    tf.addfile(data)
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        name = q["tar"].format(nn=nn)
        files[f"/mtg-jamendo/{q['type']}/{name}"] = buf.getvalue()
        tar_lines.append(f"{hashlib.sha256(buf.getvalue()).hexdigest()} {name}\n")
    meta[q["sha256_tars"]] = "".join(tar_lines).encode()
    meta[q["sha256_tracks"]] = "".join(track_lines).encode()
    files.update({f"/mtg-jamendo/metadata/{rel}": data for rel, data in meta.items()})
    return files


def serve_mirror(server, files, tmp_path, monkeypatch, mtt_clips: int | None = None):
    """Serve `files` (mtt_mirror_files(), mtg_mirror_files(), altered as a test needs) as the datasets'
    mirror: MAEST_DATASETS_MIRROR, MAEST_DATA=tmp_path/data, MAEST_OFFLINE unset. Returns the server.
    The download checks annotations_final.csv against MagnaTagATune's clip count (configs/datasets.toml);
    here that count is the served file's rows, or `mtt_clips` (a test serving a truncated file)."""
    ann = files.get("/mtt/annotations_final.csv")
    if ann is not None or mtt_clips is not None:
        import maest_cli.datasets.fetch as fetch

        clips = mtt_clips if mtt_clips is not None else sum(1 for line in ann.decode().splitlines()[1:] if line)
        real = fetch.sources

        def sources(base_url=None):
            cfg = real(base_url)
            cfg["mtt"]["clips"] = clips
            return cfg

        monkeypatch.setattr(fetch, "sources", sources)
    server.files.update(files)
    monkeypatch.setenv("MAEST_DATASETS_MIRROR", server.url)
    monkeypatch.setenv("MAEST_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("MAEST_OFFLINE", raising=False)
    return server


@pytest.fixture
def mtt_mirror(http_server, tmp_path, monkeypatch):
    """A loopback MagnaTagATune site (mtt_mirror_files) that `maest datasets download mtt` fetches
    from: MAEST_DATASETS_MIRROR points at it, MAEST_DATA at tmp_path/data, MAEST_OFFLINE is unset.
    Returns the Server (its .files, .requests, .fail, .corrupt_once)."""
    return serve_mirror(http_server, mtt_mirror_files(), tmp_path, monkeypatch)


@pytest.fixture
def mtg_mirror(http_server, tmp_path, monkeypatch):
    """A loopback MTG-Jamendo (mtg_mirror_files: metadata at the pinned commit, 100 tars, 29 of them
    with one fixture track: 14, 17, 20, ..., 98), set up as mtt_mirror is."""
    return serve_mirror(http_server, mtg_mirror_files(), tmp_path, monkeypatch)

