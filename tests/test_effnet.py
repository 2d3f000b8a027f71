"""The EfficientNet-B0 baseline has torchvision's exact architecture and Discogs-EffNet's input."""

import torch

from maest_cli.effnet import EfficientNetB0, EffNetConfig, mel_patches


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
