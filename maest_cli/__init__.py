"""maest-cli: MAEST music embeddings from audio files, with training and probes.

The Python API mirrors the commands: `extract`, `prepare_mels`, `train`, `probe`, `run_bench`,
`build_corpus`, `run_findings`, plus the
pieces they are built from (`load_model`, `load_audio`, `mel_frontend`, `MelDataset`, ...).
Names resolve on first use, so `import maest_cli` stays cheap (no torch until needed).
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    # models
    "load_model": ("registry", "load_model"),
    "load_checkpoint": ("checkpoints", "load_checkpoint"),
    "save_checkpoint": ("checkpoints", "save_checkpoint"),
    "MAEST": ("model", "MAEST"),
    "MaestConfig": ("model", "MaestConfig"),
    # audio and frontend
    "load_audio": ("audio", "load_audio"),
    "AudioError": ("audio", "AudioError"),
    "mel_frontend": ("frontend", "mel_frontend"),
    "file_mel": ("frontend", "file_mel"),
    "normalize": ("frontend", "normalize"),
    "InputNorm": ("frontend", "InputNorm"),
    # the commands
    "extract": ("extract", "extract"),
    "ExtractSummary": ("extract", "ExtractSummary"),
    "read_extract_metadata": ("embedding_store", "read_metadata"),
    "prepare_mels": ("mels", "prepare_mels"),
    "merge_datasets": ("mels", "merge_datasets"),
    "verify_dataset": ("meldataset", "verify_dataset"),
    "MelDataset": ("meldataset", "MelDataset"),
    "train": ("train", "train"),
    "TrainConfig": ("train_config", "TrainConfig"),
    "load_train_config": ("train_config", "load_train_config"),
    "probe": ("probe", "probe"),
    "load_probe": ("probe", "load_probe"),
    "run_bench": ("bench", "run_bench"),  # not `bench`: that name is the module
    "build_corpus": ("corpus", "build_corpus"),
    "run_findings": ("findings", "run_findings"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'maest_cli' has no attribute {name!r}")


__all__ = [*_LAZY, "__version__"]
