"""The EfficientNet-B0 baseline has torchvision's exact architecture and Discogs-EffNet's input."""

import torch

from maest_cli.models.effnet import EfficientNetB0, EffNetConfig, mel_patches


def test_same_parameter_count_as_torchvision():
    model = EfficientNetB0(EffNetConfig(in_channels=3, n_classes=1000))
    assert sum(p.numel() for p in model.parameters()) == 5_288_548


def test_discogs_effnet_shapes():
    model = EfficientNetB0().eval()
    patches = mel_patches(torch.randn(1876, 96))
    assert patches.shape == (29, 1, 128, 96)
    with torch.inference_mode():
        emb, logits = model(patches[:2])
    assert emb.shape == (2, 1280) and logits.shape == (2, 400)


def test_short_input_is_padded_to_one_patch():
    assert mel_patches(torch.randn(50, 96)).shape == (1, 1, 128, 96)


def test_patch_hop():
    mel = torch.arange(300 * 96, dtype=torch.float32).reshape(300, 96)
    p = mel_patches(mel)
    torch.testing.assert_close(p[1, 0], mel[62:190])


def _with_random_bn_statistics(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def test_inference_tricks_keep_the_outputs():
    """Folded BatchNorm and channels_last change the speed, not the embeddings."""
    from maest_cli.models.effnet import fold_batchnorm, for_inference, to_channels_last

    torch.manual_seed(0)
    model = _with_random_bn_statistics(EfficientNetB0())
    x = mel_patches(torch.randn(190, 96))  # 2 patches
    fast = for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    with torch.inference_mode():
        ref = model.embed(x)
        torch.testing.assert_close(fold_batchnorm(model).embed(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast.embed(to_channels_last(x)), ref, rtol=1e-4, atol=1e-4)
        emb, logits = model(x)
    torch.testing.assert_close(emb, ref)
    assert logits.shape == (x.shape[0], 400)


def test_segments_on_the_patch_grid_give_the_tracks_patches():
    """Cut at patch_grid_hop, a track's segments hold exactly the patches of the whole track."""
    from maest_cli.audio.segments import segment_starts
    from maest_cli.models.effnet import n_patches, patch_grid_hop

    mel = torch.randn(5000, 96)
    whole = mel_patches(mel)
    hop = patch_grid_hop(1876)
    starts = segment_starts(5000, 1876, hop)[:-1]  # the last segment is aligned to the track end instead
    pieces = torch.cat([mel_patches(mel[s:s + 1876]) for s in starts])
    assert hop == 29 * 62 and n_patches(1876) == 29 and n_patches(5000) == whole.shape[0]
    torch.testing.assert_close(pieces, whole[:len(pieces)])


def test_calibrated_random_weights_keep_unit_scale():
    from maest_cli.models.effnet import calibrate_batchnorm

    torch.manual_seed(0)
    x = mel_patches(torch.randn(600, 96))
    model = calibrate_batchnorm(EfficientNetB0(), x).eval()
    assert not model.training and all(m.momentum == 0.01 for m in model.modules()
                                      if isinstance(m, torch.nn.BatchNorm2d))
    with torch.inference_mode():
        assert 0.01 < model.embed(x).abs().mean() < 10  # uncalibrated: ~1e-14
