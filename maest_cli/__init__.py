"""maest-cli: MAEST music embeddings from audio files, with training and probes.

The Python API mirrors the commands: `load_model`, `mel_frontend`, `load_audio` (and, as they
land, `extract`, `prepare_mels`, `train`, `probe`, `bench`). Heavy imports happen on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("registry", "load_model"),
    "load_audio": ("audio", "load_audio"),
    "AudioError": ("audio", "AudioError"),
    "mel_frontend": ("frontend", "mel_frontend"),
    "file_mel": ("frontend", "file_mel"),
    "normalize": ("frontend", "normalize"),
    "MAEST": ("model", "MAEST"),
    "MaestConfig": ("model", "MaestConfig"),
    "load_checkpoint": ("checkpoints", "load_checkpoint"),
    "save_checkpoint": ("checkpoints", "save_checkpoint"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'maest_cli' has no attribute {name!r}")


__all__ = [*_LAZY, "__version__"]
