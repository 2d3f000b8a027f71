"""maest-cli: MAEST music embeddings from audio files, with training and probes.

The Python API mirrors the commands: `extract`, `prepare_mels`, `train`, `probe`, `run_bench`,
`build_corpus`, `run_findings`, `export_model`, plus the
pieces they are built from (`load_model`, `InferenceSpec`, `load_audio`, `mel_frontend`, `MelDataset`, ...).
Names resolve on first use, so `import maest_cli` stays cheap (no torch until needed).
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    # models
    "load_model": ("models.registry", "load_model"),
    "load_checkpoint": ("models.checkpoints", "load_checkpoint"),
    "save_checkpoint": ("models.checkpoints", "save_checkpoint"),
    "MAEST": ("models.maest", "MAEST"),
    "MaestConfig": ("models.maest", "MaestConfig"),
    # audio and frontend
    "load_audio": ("audio.decode", "load_audio"),
    "AudioError": ("audio.decode", "AudioError"),
    "mel_frontend": ("audio.frontend", "mel_frontend"),
    "file_mel": ("audio.frontend", "file_mel"),
    "normalize": ("audio.frontend", "normalize"),
    "InputNorm": ("audio.frontend", "InputNorm"),
    # the commands
    "InferenceSpec": ("embed.spec", "InferenceSpec"),
    "extract": ("embed.extraction", "extract"),
    "ExtractSummary": ("embed.extraction", "ExtractSummary"),
    "read_extract_metadata": ("embed.store", "read_metadata"),
    "prepare_mels": ("mels.prepare", "prepare_mels"),
    "merge_datasets": ("mels.prepare", "merge_datasets"),
    "verify_dataset": ("mels.dataset", "verify_dataset"),
    "MelDataset": ("mels.dataset", "MelDataset"),
    "train": ("training.loop", "train"),
    "TrainConfig": ("training.config", "TrainConfig"),
    "load_train_config": ("training.config", "load_train_config"),
    "probe": ("probing.run", "probe"),
    "load_probe": ("probing.run", "load_probe"),
    "run_bench": ("bench.throughput", "run_bench"),
    "build_corpus": ("demo.corpus", "build_corpus"),
    "run_findings": ("demo.findings", "run_findings"),
    "export_model": ("embed.export", "export_model"),
    # datasets: fetch, verify, find
    "download_dataset": ("datasets.fetch", "download_dataset"),
    "dataset_info": ("datasets.fetch", "dataset_info"),
    "list_datasets": ("datasets.fetch", "list_datasets"),
    "locate_dataset": ("datasets.layout", "locate"),
    "DatasetMissing": ("datasets.layout", "DatasetMissing"),
    "tag": ("catalogue.tags", "tag"),
    "TagTable": ("catalogue.tags", "TagTable"),
    "similar": ("catalogue.similarity", "similar"),
    "find_duplicates": ("catalogue.similarity", "find_duplicates"),
    "build_index": ("catalogue.similarity", "build_index"),
    "SimilarTable": ("catalogue.similarity", "SimilarTable"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'maest_cli' has no attribute {name!r}")


__all__ = [*_LAZY, "__version__"]
