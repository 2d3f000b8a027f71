"""MAEST model: shapes, stopping early, patchout, positional encodings."""

import pytest
import torch

from maest_cli.models.maest import (
    MAEST,
    VARIANTS,
    MaestConfig,
    Patchout,
    count_parameters,
    interpolate_pos_grid,
    random_patchout,
    resize_pos_embed,
    tiny_config,
)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return MAEST(tiny_config(frames=316, n_classes=7)).eval()


def mel(b=2, frames=316):
    return torch.randn(b, frames, 96, generator=torch.Generator().manual_seed(1))


def test_shapes(tiny):
    out = tiny(mel(), blocks=[2, 4], logits=True)
    assert set(out.tokens) == {2, 4}
    assert out.tokens[2].shape == (2, 3, 64)
    assert out.logits.shape == (2, 7)
    assert out.embedding(4).shape == (2, 192)
    assert out.embedding(4, ("avg",)).shape == (2, 64)
    torch.testing.assert_close(out.embedding(4, ("dist", "cls")),
                               torch.cat([out.tokens[4][:, 1], out.tokens[4][:, 0]], 1))


def test_tokens_are_cls_dist_and_patch_mean(tiny):
    out = tiny(mel(), blocks=[3], hidden=True)
    h = out.hidden[3]
    torch.testing.assert_close(out.tokens[3], torch.stack([h[:, 0], h[:, 1], h[:, 2:].mean(1)], 1))


def test_stops_after_requested_block(tiny):
    calls = []
    for i, blk in enumerate(tiny.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    tiny(mel(), blocks=[2])
    assert calls == [0, 1]
    calls.clear()
    tiny(mel(), blocks=[2], logits=True)
    assert calls == [0, 1, 2, 3]


def test_block_zero_and_bounds(tiny):
    assert tiny(mel(), blocks=[0]).tokens[0].shape == (2, 3, 64)
    with pytest.raises(ValueError, match="block 5 does not exist"):
        tiny(mel(), blocks=[5])


def test_same_result_whatever_else_is_requested(tiny):
    a = tiny(mel(), blocks=[2]).tokens[2]
    b = tiny(mel(), blocks=[1, 2, 4], logits=True).tokens[2]
    torch.testing.assert_close(a, b)


def _reference_with_token_selection(model, x, keep_f, keep_t):
    """Patchout by hand: full sequence, then keep tokens f*T + t, then the blocks."""
    seq = model.embed(x)
    t = model.cfg.t_patches if x.shape[1] == model.cfg.frames else (x.shape[1] - 16) // 10 + 1
    idx = [2 + f * t + c for f in keep_f for c in keep_t]
    seq = torch.cat([seq[:, :2], seq[:, idx]], 1)
    for blk in model.blocks:
        seq = blk(seq)
    return seq


@pytest.mark.parametrize("po", [Patchout(time_keep_every=3), Patchout(drop_freq_rows=(0, 8)),
                                Patchout(time_keep_every=2, drop_freq_rows=(0, 7, 8))])
def test_inference_patchout_keeps_the_right_patches(tiny, po):
    x = mel()
    f, t = tiny.cfg.f_patches, tiny.cfg.t_patches
    ref = _reference_with_token_selection(tiny, x, po.freq_index(f), po.time_index(t))
    out = tiny(x, blocks=[4], patchout=po, hidden=True).hidden[4]
    assert out.shape[1] == 2 + len(po.freq_index(f)) * len(range(0, t, po.time_keep_every))
    torch.testing.assert_close(out, ref)


def test_patchout_errors(tiny):
    with pytest.raises(ValueError, match="do not exist"):
        tiny(mel(), blocks=[1], patchout=Patchout(drop_freq_rows=(9,)))
    with pytest.raises(ValueError, match="keeps no frequency row"):
        tiny(mel(), blocks=[1], patchout=Patchout(drop_freq_rows=tuple(range(9))))


def test_training_patchout_shortens_the_sequence(tiny):
    g = torch.Generator().manual_seed(0)
    po = random_patchout(tiny.cfg.f_patches, tiny.cfg.t_patches, drop_time=15, drop_freq=3, generator=g)
    assert len(po.keep_time) == 31 - 15 and len(po.keep_freq) == 9 - 3
    assert list(po.keep_time) == sorted(po.keep_time)
    seq = tiny.embed(mel(), po)
    assert seq.shape[1] == 2 + 16 * 6


def test_shorter_input_uses_first_time_encodings(tiny):
    """A shorter clip is not padded: it sees the first T_in time encodings, as the reference does."""
    x = mel(frames=200)
    short_cfg = tiny_config(frames=200, n_classes=7)
    short = MAEST(short_cfg).eval()
    state = resize_pos_embed(tiny.state_dict(), short_cfg)
    short.load_state_dict(state)
    torch.testing.assert_close(tiny(x, blocks=[4]).tokens[4], short(x, blocks=[4]).tokens[4])


def test_input_length_limits(tiny):
    with pytest.raises(ValueError, match="takes 16 to 316"):
        tiny(mel(frames=400), blocks=[1])
    with pytest.raises(ValueError, match="takes 16 to 316"):
        tiny(mel(frames=10), blocks=[1])
    with pytest.raises(ValueError, match="expected mel of shape"):
        tiny(torch.randn(1, 316, 128), blocks=[1])


def test_grid_and_separable_encodings_agree(tiny):
    grid_cfg = tiny_config(frames=316, n_classes=7, pos_embed="grid")
    grid = MAEST(grid_cfg).eval()
    grid.load_state_dict(resize_pos_embed(tiny.state_dict(), grid_cfg))
    x = mel(frames=250)
    torch.testing.assert_close(tiny(x, blocks=[4], logits=True).logits, grid(x, blocks=[4], logits=True).logits)


def test_pos_interpolation_to_another_grid():
    g = torch.randn(1, 8, 12, 99)
    out = interpolate_pos_grid(g, 9, 187)
    assert out.shape == (1, 8, 9, 187)
    torch.testing.assert_close(interpolate_pos_grid(g, 12, 99), g)
    # constant encodings stay constant under interpolation
    c = torch.full((1, 4, 12, 99), 0.5)
    torch.testing.assert_close(interpolate_pos_grid(c, 9, 31), torch.full((1, 4, 9, 31), 0.5))


def test_resize_interpolates_longer_time_and_other_freq_grid():
    small = MAEST(tiny_config(frames=316)).state_dict()
    cfg = tiny_config(frames=626)
    state = resize_pos_embed(small, cfg)
    assert state["time_new_pos_embed"].shape == (1, 64, 1, 62)
    MAEST(cfg).load_state_dict(state)


def test_variants_and_parameter_count():
    assert {k: v.t_patches for k, v in VARIANTS.items()} == {"5s": 31, "10s": 62, "20s": 125, "30s": 187}
    assert VARIANTS["30s"].f_patches == 9
    n = count_parameters(MAEST(VARIANTS["30s"]))
    assert 85e6 < n < 87e6


def test_config_validation():
    with pytest.raises(ValueError):
        MaestConfig(width=100, heads=12)
    with pytest.raises(ValueError):
        MaestConfig(pos_embed="learned")
    with pytest.raises(ValueError, match="unknown MaestConfig fields"):
        MaestConfig.from_dict({"frames": 316, "colour": "red"})
