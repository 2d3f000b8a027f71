"""A trained run becomes a bundled model: fp16 weights with the training record, loadable."""

import json

import torch

from maest_cli.models.bundle import bundle_run
from maest_cli.models.checkpoints import load_checkpoint, save_checkpoint
from maest_cli.models.maest import MAEST, tiny_config
from maest_cli.models.registry import load_model


def test_bundle_a_run(tmp_path):
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = MAEST(tiny_config(frames=316, n_classes=3)).eval()
    save_checkpoint(run / "swa.safetensors", model, labels=["a", "b", "c"],
                    extra={"input_norm": {"mean": 1.0, "std": 0.5, "source": "dataset"}})
    (run / "config.resolved.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1, "val_map": 0.5}) + "\n")
    record = bundle_run(run, tmp_path / "w" / "mini")
    stored = load_checkpoint(tmp_path / "w" / "mini.safetensors")
    assert all(v.dtype == torch.float16 for v in stored.state.values() if v.is_floating_point())
    assert stored.labels == ["a", "b", "c"] and stored.input_norm.mean == 1.0
    assert record["epochs"] == 1 and (tmp_path / "w" / "mini.metrics.jsonl").exists()
    lm = load_model(tmp_path / "w" / "mini.safetensors")
    x = torch.randn(1, 316, 96)
    with torch.inference_mode():
        a, b = model(x, blocks=[4]).embedding(4), lm.model(x, blocks=[4]).embedding(4)
    assert torch.nn.functional.cosine_similarity(a, b).item() > 0.999
