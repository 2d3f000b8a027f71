"""Model registry and downloads, against a loopback HTTP server (nothing leaves 127.0.0.1)."""

import hashlib
import json
import shutil

import pytest
import torch
from conftest import Server
from safetensors.torch import save_file
from typer.testing import CliRunner

import maest_cli.models.registry as registry
from maest_cli.cli.app import app
from maest_cli.errors import UsageError
from maest_cli.io.download import DownloadError, download_file
from maest_cli.models.checkpoints import hf_config_dict, maest_to_hf
from maest_cli.models.maest import MAEST, MaestConfig
from maest_cli.models.registry import (
    ModelNotFound,
    WeightsMismatch,
    fetch_model,
    load_model,
    load_registry,
    model_info,
    read_record,
    resolve_weights,
)

# The release files and training inits as published (REFERENCE section 5: sha256 computed by
# the PyPI package maest-infer 0.2.0 from the release URLs). A second copy, on purpose: a typo
# in configs/models.toml would refuse every good download.
PUBLISHED = {
    "discogs-maest-5s-pw-129e-swa.ckpt":
        ("cc626ee9f0a816cadbef0a698f87424d72d7b5d84aef68983dac83bf2a03052a", 343668755),
    "discogs-maest-10s-fs-129e-swa.ckpt":
        ("62f369fbf60e93c1e93869fbac2bc60ecbcc4eb0fe99ab523f8218212490520c", 343764150),
    "discogs-maest-10s-pw-129e-swa.ckpt":
        ("9862dbc5945a62de01de0c2cccd5e499563210e307324bf6305f6932ad967f1f", 343764150),
    "discogs-maest-10s-dw-75e-swa.ckpt":
        ("1265f4cab278eb1da66a7946f4c870e2ca659076ed1aa1de718f55dc72766b68", 343763987),
    "discogs-maest-20s-pw-129e-swa.ckpt":
        ("1ea0880da17aed1b149323ae46c7dbbe6cf6c02c9d30a3f7931a962f7169353b", 343957686),
    "discogs-maest-30s-pw-129e-swa.ckpt":
        ("2e8ac8ebdc8ac4a3750583df23fd715605935286cbd9d2c4231dfeaa3736ad01", 344148150),
    "discogs-maest-30s-pw-73e-ts-swa.ckpt":
        ("26b954652cd75b0951a67b7ab8f85b8b4c459f63a921a04f62829de85ea801fb", 344148476),
    "discogs-maest-30s-pw-129e-519l-swa.ckpt":
        ("d6044e642b6ae295ee1164cc52b33ac663e247f03b4b100a0af1a5edfab18cdb", 344878270),
    "passt-s-f128-p16-s10-ap.476-swa.pt":
        ("302903fa8c4aee817b11dc982da0b29aaf8d11a3e722420476d0a12c9db70c2c", 344665734),
    "deit_base_patch16_384-8de9b5d1.pth":
        ("8de9b5d10c6b031785248aae8bcfa7be14237dbc383a55ad8d5d4d93292512da", 347486471),
}

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("loopback_only")  # tests/conftest.py: nothing leaves 127.0.0.1


@pytest.fixture
def server(http_server):
    return http_server


DATA = bytes(range(256)) * 4000
DATA_SHA = hashlib.sha256(DATA).hexdigest()


# ---------------------------------------------------------------- download_file

def test_download_resumes_after_interruption(server, tmp_path):
    server.files["/w.bin"] = DATA
    server.cut_after = 300_000
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError, match="interrupted"):
        download_file(server.url + "/w.bin", dest, sha256=DATA_SHA, progress=False)
    assert not dest.exists() and (tmp_path / "w.bin.part").stat().st_size == 300_000
    download_file(server.url + "/w.bin", dest, sha256=DATA_SHA, progress=False)
    assert dest.read_bytes() == DATA and not (tmp_path / "w.bin.part").exists()
    assert server.requests[-1][1] == "bytes=300000-"


def test_wrong_hash_or_size_is_deleted_and_refused_in_one_line(server, tmp_path):
    server.files["/w.bin"] = b"x" * 1000
    got = hashlib.sha256(b"x" * 1000).hexdigest()
    with pytest.raises(DownloadError) as e:
        download_file(server.url + "/w.bin", tmp_path / "w.bin", sha256="0" * 64, progress=False)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("w.bin: ") and f"expected sha256 {'0' * 64}, got {got}" in str(e.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DownloadError, match="w.bin: expected 999 bytes, the server .* offers 1000"):
        download_file(server.url + "/w.bin", tmp_path / "w.bin", size=999, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_server_that_ignores_range_still_gives_the_right_file(server, tmp_path):
    server.files["/w.bin"] = DATA
    server.ignore_range = True
    dest = tmp_path / "w.bin"
    (tmp_path / "w.bin.part").write_bytes(b"\xff" * 5000)  # not even a prefix of the file
    download_file(server.url + "/w.bin", dest, progress=False)  # unpinned: only the restart saves it
    assert server.requests == [("/w.bin", "bytes=5000-")]  # a resume was asked, a 200 came back
    assert dest.read_bytes() == DATA and not (tmp_path / "w.bin.part").exists()


@pytest.mark.parametrize("range_total", [True, False])
def test_complete_part_answered_416_is_verified_and_finished(server, tmp_path, range_total):
    server.files["/w.bin"] = DATA
    server.range_total = range_total
    (tmp_path / "w.bin.part").write_bytes(DATA)
    dest = download_file(server.url + "/w.bin", tmp_path / "w.bin", sha256=DATA_SHA, size=len(DATA), progress=False)
    assert dest.read_bytes() == DATA and not (tmp_path / "w.bin.part").exists()
    assert server.requests == [("/w.bin", f"bytes={len(DATA)}-")]  # one request: nothing fetched again


def test_part_longer_than_the_file_starts_over_once(server, tmp_path):
    server.files["/w.bin"] = DATA
    (tmp_path / "w.bin.part").write_bytes(DATA + b"junk")
    download_file(server.url + "/w.bin", tmp_path / "w.bin", progress=False)  # unpinned: the 416's */N says so
    assert (tmp_path / "w.bin").read_bytes() == DATA
    assert server.requests == [("/w.bin", f"bytes={len(DATA) + 4}-"), ("/w.bin", None)]


def test_corrupt_complete_part_is_deleted_then_fetched_whole(server, tmp_path):
    server.files["/w.bin"] = DATA
    (tmp_path / "w.bin.part").write_bytes(b"\x00" * len(DATA))
    with pytest.raises(DownloadError, match=f"expected sha256 {DATA_SHA}"):
        download_file(server.url + "/w.bin", tmp_path / "w.bin", sha256=DATA_SHA, progress=False)
    assert list(tmp_path.iterdir()) == []
    download_file(server.url + "/w.bin", tmp_path / "w.bin", sha256=DATA_SHA, progress=False)
    assert (tmp_path / "w.bin").read_bytes() == DATA and server.requests[-1] == ("/w.bin", None)


def test_http_errors(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download_file(server.url + "/nope", tmp_path / "x", progress=False)


def test_busy_server_and_dropped_transfer_are_retried_with_backoff(server, tmp_path, monkeypatch):
    import maest_cli.io.download as download

    waits = []
    monkeypatch.setattr(download.time, "sleep", waits.append)
    server.files["/w.bin"] = DATA
    server.fail["/w.bin"] = [503, 0]  # busy, then served but dropped at 100,000 bytes
    server.cut_after = 100_000
    _, digest = download.download_with_digest(server.url + "/w.bin", tmp_path / "w.bin", DATA_SHA, progress=False,
                                              retries=2, backoff=0.5)
    assert digest == DATA_SHA and waits == [0.5, 1.0]
    assert server.requests == [("/w.bin", None), ("/w.bin", None), ("/w.bin", "bytes=100000-")]
    with pytest.raises(DownloadError, match="404"):  # not worth retrying
        download.download_with_digest(server.url + "/nope", tmp_path / "x", progress=False, retries=2)
    assert waits == [0.5, 1.0]


def test_free_space_is_checked_before_the_first_byte(server, tmp_path, monkeypatch):
    import maest_cli.io.download as download

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: usage._replace(free=len(DATA) * 2 - 1))
    server.files["/w.bin"] = DATA
    with pytest.raises(download.NoSpaceError, match=r"^w.bin: needs 2.0 MB free in .*, 2.0 MB available"):
        download.download_with_digest(server.url + "/w.bin", tmp_path / "w.bin", progress=False, unpack_ratio=1.0)
    assert list(tmp_path.iterdir()) == []
    download.download_with_digest(server.url + "/w.bin", tmp_path / "w.bin", progress=False, unpack_ratio=0.5)


# ---------------------------------------------------------------- the registry's sources

def _registry(tmp_path, server, labels_file, sha="", size=0):
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
size = {size}

[inits.tiny-init]
url = "{server.url}/init/tiny-init.pt"
sha256 = "{DATA_SHA}"
size = {len(DATA)}
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


def _serve_hf(server, tmp_path, model) -> bytes:
    """The same weights in the Hugging Face layout, served as the port's files; returns the weights file."""
    st = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in maest_to_hf(model.state_dict(), model.cfg).items()}, str(st))
    server.files["/hf/org/tiny/resolve/main/model.safetensors"] = st.read_bytes()
    server.files["/hf/org/tiny/resolve/main/config.json"] = json.dumps(hf_config_dict(model.cfg)).encode()
    return st.read_bytes()


def test_load_model_by_name_downloads_into_cache(server, tmp_path, tiny_official, monkeypatch):
    model, blob, labels = tiny_official
    monkeypatch.delenv("MAEST_OFFLINE")
    server.files["/gh/tiny-swa.ckpt"] = blob
    reg = _registry(tmp_path, server, labels, sha=hashlib.sha256(blob).hexdigest(), size=len(blob))
    cache = tmp_path / "cache"
    lm = load_model("tiny", registry=reg, cache=cache, progress=False)
    assert lm.name == "tiny-official" and lm.labels == ["Rock---Punk", "Jazz---Bop", "Pop---Disco"]
    assert lm.sha256 == hashlib.sha256(blob).hexdigest() and lm.pinned and lm.source == "official"
    assert (cache / "tiny-official" / "tiny-swa.ckpt").read_bytes() == blob
    record = json.loads((cache / "tiny-official" / "source.json").read_text())
    assert record["source"] == "official" and record["pinned"] is True and record["sha256"] == lm.sha256
    x = torch.randn(1, 316, 96)
    with torch.inference_mode():
        torch.testing.assert_close(lm.model(x, logits=True).logits, model.eval()(x, logits=True).logits)
    n = len(server.requests)
    load_model("tiny-official", registry=reg, cache=cache, progress=False)  # cached: no request
    assert len(server.requests) == n
    assert load_model(str(cache / "tiny-official" / "tiny-swa.ckpt"), registry=reg).pinned  # a pinned file by path
    env = {"MAEST_REGISTRY": str(tmp_path / "models.toml"), "MAEST_CACHE": str(cache)}
    r = runner.invoke(app, ["models", "download", "tiny"], env=env)  # pinned: the path alone
    assert r.exit_code == 0 and r.stdout.strip() == f"tiny-official: {cache / 'tiny-official' / 'tiny-swa.ckpt'}"


def test_hugging_face_fallback_gives_the_outputs_of_the_official_file(server, tmp_path, tiny_official, monkeypatch):
    """Official file unavailable (404): the port's files, converted, must be the same model."""
    model, blob, labels = tiny_official
    monkeypatch.delenv("MAEST_OFFLINE")
    _serve_hf(server, tmp_path, model)
    reg = _registry(tmp_path, server, labels)
    hf = load_model("tiny", registry=reg, cache=tmp_path / "cache", progress=False)
    assert hf.source_format == "hf" and hf.model.cfg.pos_embed == "grid" and hf.source == "hf"
    official = load_model(str(tmp_path / "tiny-swa.ckpt"), registry=reg)  # the same weights, official format
    assert official.source_format == "official"
    x = torch.randn(2, 316, 96, generator=torch.Generator().manual_seed(1))
    blocks = range(model.cfg.depth + 1)
    with torch.inference_mode():
        a = official.model(x, blocks=blocks, logits=True)
        b = hf.model(x, blocks=blocks, logits=True)
    for k in blocks:  # embeddings (cls, dist, mean of patch tokens) after every block
        torch.testing.assert_close(b.tokens[k], a.tokens[k], rtol=0, atol=1e-5, msg=f"block {k}")
    # the port's head LayerNorm has eps 1e-6 where the release has 1e-5: close, not bit-equal
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-4)
    assert not torch.allclose(a.logits, torch.zeros_like(a.logits))


def test_wrong_hash_is_refused_deleted_and_the_fallback_used(server, tmp_path, tiny_official, monkeypatch, capsys):
    model, blob, labels = tiny_official
    monkeypatch.delenv("MAEST_OFFLINE")
    server.files["/gh/tiny-swa.ckpt"] = blob
    hf_blob = _serve_hf(server, tmp_path, model)
    pin = hashlib.sha256(b"the file the authors released").hexdigest()
    reg = _registry(tmp_path, server, labels, sha=pin, size=len(blob))  # right size, wrong bytes
    cache = tmp_path / "cache"
    lm = load_model("tiny", registry=reg, cache=cache, progress=False)
    refusals = [line for line in capsys.readouterr().err.splitlines() if "tiny-swa.ckpt" in line]
    assert len(refusals) == 1, refusals
    assert f"expected sha256 {pin}, got {hashlib.sha256(blob).hexdigest()}" in refusals[0]
    assert "trying the Hugging Face port" in refusals[0]
    assert sorted(p.name for p in (cache / "tiny-official").iterdir()) == ["config.json", "model.safetensors",
                                                                           "source.json"]
    assert lm.source == "hf" and not lm.pinned and lm.recorded_sha256 == hashlib.sha256(hf_blob).hexdigest()


def test_models_download_records_the_hash_of_the_unpinned_fallback(server, tmp_path, tiny_official, monkeypatch):
    model, _, labels = tiny_official
    monkeypatch.delenv("MAEST_OFFLINE")
    hf_blob = _serve_hf(server, tmp_path, model)
    _registry(tmp_path, server, labels)
    cache = tmp_path / "cache"
    env = {"MAEST_REGISTRY": str(tmp_path / "models.toml"), "MAEST_CACHE": str(cache)}
    r = runner.invoke(app, ["models", "download", "tiny"], env=env)
    assert r.exit_code == 0, r.output
    weights = cache / "tiny-official" / "model.safetensors"
    record = read_record(weights)
    assert record["sha256"] == hashlib.sha256(hf_blob).hexdigest() == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["source"] == "hf" and record["pinned"] is False
    line = f"tiny-official: {weights} (unpinned: no published hash; sha256 {record['sha256']} recorded)"
    assert r.stdout.strip() == line  # strip: the progress bar of the download leaves a blank line
    r = runner.invoke(app, ["models", "info", "tiny"], env=env)
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert (shown["source"], shown["pinned"], shown["recorded_sha256"]) == ("hf", False, record["sha256"])
    reg = load_registry(tmp_path / "models.toml")
    info = model_info("tiny", registry=reg, cache=cache)  # what `maest models info` shows
    assert (info["source"], info["pinned"], info["recorded_sha256"]) == ("hf", False, record["sha256"])
    # the cached file changes afterwards: refused against the recorded hash, named in one line
    torch.manual_seed(1)
    other = MAEST(model.cfg)
    save_file({k: v.contiguous() for k, v in maest_to_hf(other.state_dict(), other.cfg).items()}, str(weights))
    with pytest.raises(WeightsMismatch, match=f"expected sha256 {record['sha256']} .*recorded"):
        load_model("tiny", registry=reg, cache=cache, progress=False)
    assert "recorded" in model_info("tiny", registry=reg, cache=cache)["note"]


def test_training_inits_download_pinned_and_never_load_as_models(server, tmp_path, tiny_official, monkeypatch):
    monkeypatch.delenv("MAEST_OFFLINE")
    server.files["/init/tiny-init.pt"] = DATA
    reg = _registry(tmp_path, server, tiny_official[2])
    path = fetch_model(reg.get("tiny-init"), cache=tmp_path / "cache", progress=False)
    assert path.read_bytes() == DATA and read_record(path)["pinned"] is True
    with pytest.raises(UsageError, match="maest train --init tiny-init"):
        load_model("tiny-init", registry=reg, cache=tmp_path / "cache")
    info = model_info("tiny-init", registry=reg, cache=tmp_path / "cache")
    assert info["kind"] == "init" and info["cached"] and info["sources"][0]["pinned"]


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
    dead.stop()
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
    assert lm.source is None and not lm.pinned


# ---------------------------------------------------------------- the shipped registry

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
    assert reg.get("passt-s").sources[0].files[0].url == (
        "https://github.com/kkoutini/PaSST/releases/download/v0.0.1-audioset/passt-s-f128-p16-s10-ap.476-swa.pt")
    assert reg.get("deit-base-384").sources[0].files[0].url == (
        "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_384-8de9b5d1.pth")


def test_every_published_file_is_pinned_with_the_published_hash_and_size():
    reg = load_registry()
    pinned = {f.filename: (f.sha256, f.size) for m in [*reg.models.values(), *reg.inits.values()]
              for s in m.sources if s.kind == "official" for f in s.files}
    assert pinned == PUBLISHED
    hf = [f for m in reg.models.values() for s in m.sources if s.kind == "hf" for f in s.files]
    assert hf and all(f.sha256 is None for f in hf)  # the port publishes none: recorded at download


def test_bundled_model_loads_offline_from_the_package(tmp_path, tiny_model_file, monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(tiny_model_file, weights / "mini.safetensors")
    monkeypatch.setattr(registry, "bundled_dir", lambda: weights)
    (tmp_path / "models.toml").write_text(
        'default = "mini"\n[models.mini]\nvariant = "5s"\nbundled_file = "mini.safetensors"\n')
    reg = load_registry(tmp_path / "models.toml")
    lm = load_model("mini", registry=reg, cache=tmp_path / "cache", progress=False)
    assert lm.name == "mini" and lm.labels[0] == "tag0"  # labels from the file itself
    assert lm.source == "bundled" and not lm.pinned
    (weights / "mini.safetensors").unlink()
    with pytest.raises(ModelNotFound, match="missing from this installation"):
        load_model("mini", registry=reg, cache=tmp_path / "cache", progress=False)
