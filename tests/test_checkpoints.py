"""Checkpoints: HF parity (transformers as the oracle), format round trips, safe loading."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from transformers import ASTConfig, ASTForAudioClassification  # the oracle (dev extra): missing is a failure

from maest_cli.models.checkpoints import (
    CheckpointError,
    build_model,
    hf_config_dict,
    hf_to_maest,
    load_checkpoint,
    maest_to_hf,
    save_checkpoint,
)
from maest_cli.models.maest import MAEST, VARIANTS, tiny_config


def hf_model(frames, width, depth, heads, mlp, n_labels, seed=0):
    cfg = ASTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                    intermediate_size=mlp, num_mel_bins=96, max_length=frames, frequency_stride=10,
                    time_stride=10, layer_norm_eps=1e-6, num_labels=n_labels)
    torch.manual_seed(seed)
    model = ASTForAudioClassification(cfg).eval()
    with torch.no_grad():  # HF inits LayerNorms to identity and biases to zero: randomise all
        for p in model.parameters():
            p.normal_(0, 0.05)
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.add_(1.0)
    return model


CONFIGS = {
    "maest-30s": dict(frames=1876, width=768, depth=12, heads=12, mlp=3072, n_labels=400),
    "tiny": dict(frames=316, width=64, depth=3, heads=4, mlp=128, n_labels=10),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_parity_every_block_and_logits(name, tmp_path):
    c = CONFIGS[name]
    hf = hf_model(**c)
    hf.save_pretrained(tmp_path / "hf")  # the hub layout: encoder.layer.N.attention.attention.query ...
    ckpt = load_checkpoint(tmp_path / "hf")
    assert ckpt.source_format == "hf" and ckpt.config.heads == c["heads"]
    ours = build_model(ckpt)
    x = torch.randn(1, c["frames"], 96, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = hf(x, output_hidden_states=True)
        out = ours(x, blocks=range(c["depth"] + 1), logits=True, hidden=True)
    for k in range(c["depth"] + 1):
        torch.testing.assert_close(out.hidden[k], ref.hidden_states[k], rtol=0, atol=1e-4, msg=f"block {k}")
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-4)


def test_hf_in_memory_names_of_transformers_5_convert_too():
    c = CONFIGS["tiny"]
    hf = hf_model(**c)
    state, cfg = hf_to_maest(hf.state_dict(), hf.config.to_dict())
    ours = MAEST(cfg).eval()
    ours.load_state_dict(state)
    x = torch.randn(2, 316, 96)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x, logits=True).logits, hf(x).logits, rtol=0, atol=1e-5)


def _official_state(cfg, seed=0):
    """A state dict with the official key names, as the GitHub .ckpt files hold."""
    torch.manual_seed(seed)
    state = MAEST(cfg).state_dict()
    state["head_dist.weight"] = torch.randn(cfg.n_classes, cfg.width)
    state["head_dist.bias"] = torch.randn(cfg.n_classes)
    state["melspectrogram.window"] = torch.randn(512)  # newer code adds frontend buffers
    return state


def test_official_ckpt_loads_and_round_trips_through_hf(tmp_path):
    cfg = tiny_config(frames=316, n_classes=10)
    official = _official_state(cfg)
    torch.save(official, tmp_path / "official.ckpt")
    ckpt = load_checkpoint(tmp_path / "official.ckpt")
    assert ckpt.source_format == "official" and ckpt.config.t_patches == 31
    assert ckpt.config.heads == 1  # not in the weights: 64 dims per head, as ViT-B (768 -> 12)
    ours = build_model(ckpt)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, official[k]), k

    hf1 = maest_to_hf(ours.state_dict(), ours.cfg)
    state2, cfg2 = hf_to_maest(hf1, hf_config_dict(ours.cfg))
    hf2 = maest_to_hf(state2, cfg2)
    assert hf1.keys() == hf2.keys() and all(torch.equal(hf1[k], hf2[k]) for k in hf1)
    again = MAEST(cfg2).eval()
    again.load_state_dict(state2)
    for k, v in state2.items():
        if k != "grid_pos_embed":
            assert torch.equal(v, official[k]), k
    assert torch.equal(state2["grid_pos_embed"], official["freq_new_pos_embed"] + official["time_new_pos_embed"])
    # Same function; only float rounding differs (x + freq + time vs x + grid; the HF form's
    # single epsilon makes the head LayerNorm's 1e-5 become 1e-6).
    x = torch.randn(2, 316, 96)
    with torch.inference_mode():
        torch.testing.assert_close(again(x, logits=True).logits, ours(x, logits=True).logits, rtol=0, atol=1e-4)


def test_our_weights_in_hf_layout_run_in_transformers(tmp_path):
    """maest_to_hf checked against the oracle: transformers loads our export, same outputs."""

    cfg = tiny_config(frames=316, n_classes=10, head_norm_eps=1e-6)
    torch.manual_seed(1)
    ours = MAEST(cfg).eval()
    d = tmp_path / "export"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in maest_to_hf(ours.state_dict(), cfg).items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    hc = hf_config_dict(cfg, [f"t{i}" for i in range(10)])
    (d / "config.json").write_text(json.dumps(hc))
    hf = ASTForAudioClassification.from_pretrained(d).eval()
    x = torch.randn(1, 316, 96)
    with torch.inference_mode():
        torch.testing.assert_close(hf(x).logits, ours(x, logits=True).logits, rtol=0, atol=1e-5)


def test_own_format_round_trip(tmp_path):
    cfg = tiny_config(frames=626, n_classes=5)
    model = MAEST(cfg)
    path = save_checkpoint(tmp_path / "m.safetensors", model, labels=list("abcde"), extra={"name": "x"})
    ckpt = load_checkpoint(path)
    assert ckpt.source_format == "maest-cli" and ckpt.config == cfg and ckpt.labels == list("abcde")
    assert ckpt.metadata["name"] == "x" and len(ckpt.sha256) == 64
    loaded = build_model(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert not list(tmp_path.glob(".*tmp*"))


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MARKER']}",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MARKER", str(marker))
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"cls_token": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    assert not marker.exists()
    # same object inside a real torch zip checkpoint
    torch.save({"state_dict": {"x": _RunsCode()}}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil2.pt")
    assert not marker.exists()


def test_mismatched_keys_and_shapes_are_named(tmp_path):
    cfg = tiny_config(frames=316, n_classes=10)
    state = _official_state(cfg)
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.proj.weight"] = torch.zeros(64, 32)
    state["extra.thing"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.ckpt")
    ckpt = load_checkpoint(tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError) as e:
        build_model(ckpt)
    msg = str(e.value)
    assert "blocks.1.mlp.fc2.bias" in msg and "blocks.0.attn.proj.weight" in msg and "extra.thing" in msg


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.ckpt").write_text("hello")
    with pytest.raises(CheckpointError, match="x.ckpt"):
        load_checkpoint(tmp_path / "x.ckpt")
    torch.save({"foo": torch.zeros(2)}, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match="not a MAEST checkpoint"):
        load_checkpoint(tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_official_30s_key_layout_and_shapes():
    """Our parameter names and shapes are those listed for the published checkpoints."""
    sd = MAEST(VARIANTS["30s"]).state_dict()
    assert sd["patch_embed.proj.weight"].shape == (768, 1, 16, 16)
    assert sd["freq_new_pos_embed"].shape == (1, 768, 9, 1)
    assert sd["time_new_pos_embed"].shape == (1, 768, 1, 187)
    assert sd["new_pos_embed"].shape == (1, 2, 768)
    assert sd["blocks.11.attn.qkv.weight"].shape == (2304, 768)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (3072, 768)
    assert sd["head.1.weight"].shape == (400, 768)
    assert {"head.0.weight", "norm.bias", "cls_token", "dist_token"} <= sd.keys()


def test_one_writer_for_maest_and_effnet_checkpoints(tmp_path, monkeypatch):
    """Both architectures go through write_checkpoint: atomic, shared permissions, and `extra`
    never changes what the file is."""
    import maest_cli.models.checkpoints as ck
    import maest_cli.training.effnet as eff_module
    from maest_cli.training.effnet import FORMAT as EFFNET_FORMAT
    from maest_cli.training.effnet import EffNetError, build_tagger, load_effnet, save_effnet_checkpoint

    calls = []

    def spy(path, *args, **kw):
        calls.append(path)
        return ck_write(path, *args, **kw)

    ck_write = ck.write_checkpoint
    assert eff_module.write_checkpoint is ck_write
    monkeypatch.setattr(ck, "write_checkpoint", spy)
    monkeypatch.setattr(eff_module, "write_checkpoint", spy)
    mask = os.umask(0)
    os.umask(mask)
    lie = {"format": "something-else", "config": "{}", "labels": "[]", "name": "n"}
    m = save_checkpoint(tmp_path / "m.safetensors", MAEST(tiny_config(frames=316, n_classes=3)), list("abc"), extra=lie)
    e = save_effnet_checkpoint(tmp_path / "e.safetensors", build_tagger(3), list("abc"), extra=lie)
    assert calls == [m, e]
    ckpt = load_checkpoint(m)
    assert ckpt.source_format == "maest-cli" and ckpt.labels == list("abc") and ckpt.metadata["name"] == "n"
    loaded = load_effnet(e)
    assert loaded.metadata["format"] == EFFNET_FORMAT and loaded.labels == list("abc") and loaded.name == "n"
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~mask for p in (m, e))  # safetensors alone makes 0600
    with pytest.raises(CheckpointError):
        load_checkpoint(e)  # an EfficientNet is never mistaken for a MAEST
    with pytest.raises(EffNetError):
        load_effnet(m)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    before = m.read_bytes()
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(m, MAEST(tiny_config(frames=316, n_classes=3)))
    assert m.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors", "m.safetensors"]
