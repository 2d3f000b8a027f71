"""Model registry and downloads, against a loopback HTTP server (no internet needed)."""

import hashlib
import http.server
import json
import threading

import pytest
import torch

from maest_cli.models.maest import MAEST, MaestConfig
from maest_cli.models.registry import (DownloadError, ModelNotFound, download_file, load_model, load_registry,
                                resolve_weights)


class Server:
    """Serves `files` with Range support; `cut_after` drops the connection mid-transfer once."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_after: int | None = None
        self.requests: list[tuple[str, str | None]] = []
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                srv.requests.append((self.path, rng))
                body = srv.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206 if rng else 200)
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
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def test_download_resumes_after_interruption(server, tmp_path):
    data = bytes(range(256)) * 4000
    server.files["/w.bin"] = data
    server.cut_after = 300_000
    dest = tmp_path / "w.bin"
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(DownloadError, match="interrupted"):
        download_file(server.url + "/w.bin", dest, sha256=sha, progress=False)
    assert not dest.exists() and (tmp_path / "w.bin.part").stat().st_size == 300_000
    download_file(server.url + "/w.bin", dest, sha256=sha, progress=False)
    assert dest.read_bytes() == data and not (tmp_path / "w.bin.part").exists()
    assert server.requests[-1][1] == "bytes=300000-"


def test_corrupt_download_is_deleted(server, tmp_path):
    server.files["/w.bin"] = b"x" * 1000
    with pytest.raises(DownloadError, match="does not match"):
        download_file(server.url + "/w.bin", tmp_path / "w.bin", sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DownloadError, match="expected 999"):
        download_file(server.url + "/w.bin", tmp_path / "w.bin", size=999, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_errors(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download_file(server.url + "/nope", tmp_path / "x", progress=False)


def _registry(tmp_path, server, labels_file, sha=""):
    toml = f"""
default = "tiny-official"
github_base = "{server.url}/gh/"
hf_base = "{server.url}/hf/"
[models.tiny-official]
aliases = ["tiny"]
variant = "5s"
labels = "{labels_file}"
github_file = "tiny-swa.ckpt"
hf_repo = "org/tiny"
sha256 = "{sha}"
"""
    p = tmp_path / "models.toml"
    p.write_text(toml)
    return load_registry(p)


@pytest.fixture
def tiny_official(tmp_path):
    torch.manual_seed(0)  # official files do not record heads: 64 dims per head is assumed
    model = MAEST(MaestConfig(frames=316, width=64, depth=2, heads=1, mlp_dim=128, n_classes=3))
    path = tmp_path / "tiny-swa.ckpt"
    torch.save(model.state_dict(), path)
    labels = tmp_path / "labels.txt"
    labels.write_text("Rock---Punk\nJazz---Bop\nPop---Disco\n")
    return model, path.read_bytes(), str(labels)


def test_load_model_by_name_downloads_into_cache(server, tmp_path, tiny_official, monkeypatch):
    model, blob, labels = tiny_official
    monkeypatch.delenv("MAEST_OFFLINE")
    server.files["/gh/tiny-swa.ckpt"] = blob
    reg = _registry(tmp_path, server, labels, sha=hashlib.sha256(blob).hexdigest())
    cache = tmp_path / "cache"
    lm = load_model("tiny", registry=reg, cache=cache, progress=False)
    assert lm.name == "tiny-official" and lm.labels == ["Rock---Punk", "Jazz---Bop", "Pop---Disco"]
    assert lm.sha256 == hashlib.sha256(blob).hexdigest()
    assert (cache / "tiny-official" / "tiny-swa.ckpt").read_bytes() == blob
    assert json.loads((cache / "tiny-official" / "source.json").read_text())["source"] == "official"
    x = torch.randn(1, 316, 96)
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(x, logits=True).logits, model.eval()(x, logits=True).logits)
    n = len(server.requests)
    load_model("tiny-official", registry=reg, cache=cache, progress=False)  # cached: no request
    assert len(server.requests) == n


def test_falls_back_to_hugging_face(server, tmp_path, tiny_official, monkeypatch):
    from safetensors.torch import save_file

    from maest_cli.models.checkpoints import hf_config_dict, maest_to_hf

    model, _, labels = tiny_official
    monkeypatch.delenv("MAEST_OFFLINE")
    st = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in maest_to_hf(model.state_dict(), model.cfg).items()}, str(st))
    server.files["/hf/org/tiny/resolve/main/model.safetensors"] = st.read_bytes()
    server.files["/hf/org/tiny/resolve/main/config.json"] = json.dumps(hf_config_dict(model.cfg)).encode()
    reg = _registry(tmp_path, server, labels)
    lm = load_model("tiny", registry=reg, cache=tmp_path / "cache", progress=False)
    assert lm.source_format == "hf" and lm.model.cfg.pos_embed == "grid"


def test_offline_error_says_which_file_to_put_where(server, tmp_path, tiny_official):
    reg = _registry(tmp_path, server, tiny_official[2])
    with pytest.raises(ModelNotFound) as e:
        load_model(None, registry=reg, cache=tmp_path / "cache", progress=False)
    msg = str(e.value)
    assert "tiny-swa.ckpt" in msg and str(tmp_path / "cache" / "tiny-official") in msg
    assert "maest models download tiny-official" in msg
    assert server.requests == []


def test_unreachable_server_error(tmp_path, tiny_official, monkeypatch):
    monkeypatch.delenv("MAEST_OFFLINE")
    dead = Server()
    dead.httpd.shutdown()
    dead.httpd.server_close()
    reg = _registry(tmp_path, dead, tiny_official[2])
    with pytest.raises(ModelNotFound, match="could not be downloaded"):
        load_model("tiny", registry=reg, cache=tmp_path / "cache", progress=False)


def test_unknown_name_and_local_paths(tmp_path, tiny_model_file):
    reg = load_registry()
    with pytest.raises(ModelNotFound, match="Did you mean"):
        resolve_weights("maest-30", registry=reg)
    with pytest.raises(ModelNotFound, match="no such file"):
        resolve_weights(str(tmp_path / "missing.ckpt"), registry=reg)
    lm = load_model(tiny_model_file)
    assert lm.labels[0] == "tag0" and lm.source_format == "maest-cli"


def test_official_registry_is_complete():
    reg = load_registry()
    assert reg.default == "discogs-maest-30s-pw-129e"
    official = [m for m in reg.models.values() if m.sources and m.sources[0].kind == "official"]
    assert len(official) == 8 and reg.get("maest-tiny").sources[0].kind == "bundled"
    assert reg.get("maest-30s").name == "discogs-maest-30s-pw-129e"
    urls = [s.files[0].url for s in reg.get("maest-30s").sources]
    assert urls[0] == ("https://github.com/palonso/MAEST/releases/download/v0.0.0-beta/"
                       "discogs-maest-30s-pw-129e-swa.ckpt")
    assert urls[1] == "https://huggingface.co/mtg-upf/discogs-maest-30s-pw-129e/resolve/main/model.safetensors"
    assert reg.get("maest-30s-519l").labels == "discogs519"


def test_bundled_model_loads_offline_from_the_package(tmp_path, tiny_model_file, monkeypatch):
    import shutil

    import maest_cli.models.registry as registry

    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(tiny_model_file, weights / "mini.safetensors")
    monkeypatch.setattr(registry, "bundled_dir", lambda: weights)
    (tmp_path / "models.toml").write_text(
        'default = "mini"\n[models.mini]\nvariant = "5s"\nbundled_file = "mini.safetensors"\n')
    reg = load_registry(tmp_path / "models.toml")
    lm = load_model("mini", registry=reg, cache=tmp_path / "cache", progress=False)
    assert lm.name == "mini" and lm.labels[0] == "tag0"  # labels from the file itself
    (weights / "mini.safetensors").unlink()
    with pytest.raises(ModelNotFound, match="missing from this installation"):
        load_model("mini", registry=reg, cache=tmp_path / "cache", progress=False)
