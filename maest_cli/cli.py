"""The `maest` command: parse options, call the Python API, map errors to exit codes.

torch and the heavy modules are imported inside the commands, so `maest --help` is instant.
Exit codes: 0 success, 1 some inputs failed (or the run failed), 2 usage error.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="maest",
    help="MAEST music embeddings: mel-spectrograms, training, extraction, probes and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="The official MAEST models: list, download, inspect.", no_args_is_help=True)
app.add_typer(models_app, name="models")

err = Console(stderr=True, highlight=False)


def _exit_code(e: BaseException) -> int | None:
    """2 for usage/config/model errors, 1 for failures of the run; None: a bug, let it raise."""
    from .audio import AudioError
    from .checkpoints import CheckpointError
    from .config import ConfigError
    from .registry import DownloadError, ModelNotFound
    from .runtime import UsageError

    if isinstance(e, (UsageError, ConfigError, ModelNotFound, CheckpointError)):
        return 2
    if isinstance(e, (AudioError, DownloadError, OSError)):
        return 1
    return None


def print_error(e: BaseException | str) -> None:
    """Errors go to stderr unwrapped (rich would fold long paths across lines)."""
    print(f"maest: error: {e}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def errors_to_exit_codes():
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        err.print("maest: interrupted")
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - mapped or re-raised below
        code = _exit_code(e)
        if code is None:
            raise
        print_error(e)
        raise typer.Exit(code) from None


# ------------------------------------------------------------------ models

@models_app.command("list")
def models_list(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """The registry of official models and whether each is in the cache."""
    with errors_to_exit_codes():
        from .registry import cache_dir, cached_weights, load_registry

        reg = load_registry()
        rows = [{"name": m.name, "aliases": list(m.aliases), "variant": m.variant, "labels": m.labels,
                 "default": m.name == reg.default, "cached": str(cached_weights(m) or ""),
                 "description": m.description} for m in reg.models.values()]
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        from rich.table import Table

        t = Table(title=f"MAEST models (cache: {cache_dir()})")
        for col in ("name", "aliases", "segment", "labels", "cached", "description"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["name"] + (" (default)" if r["default"] else ""), ", ".join(r["aliases"]),
                      r["variant"], r["labels"], "yes" if r["cached"] else "no", r["description"])
        Console().print(t)
        Console().print("Weights: CC BY-NC-SA 4.0 (non-commercial use).")


@models_app.command("download")
def models_download(
    names: list[str] = typer.Argument(None, help="Model names or aliases (default: the default model)."),
    all_models: bool = typer.Option(False, "--all", help="Download every model of the registry."),
) -> None:
    """Fetch weights into the cache (resumable, verified, atomic)."""
    with errors_to_exit_codes():
        from .registry import fetch_model, load_registry

        reg = load_registry()
        entries = list(reg.models.values()) if all_models else [reg.get(n) for n in (names or [reg.default])]
        failed = 0
        for entry in entries:
            try:
                path = fetch_model(entry)
                err.print(f"{entry.name}: {path}")
            except Exception as e:  # noqa: BLE001 - report each model, go on
                if _exit_code(e) is None:
                    raise
                print_error(e)
                failed += 1
        if failed:
            raise typer.Exit(1)


@models_app.command("info")
def models_info(
    model: str = typer.Argument(..., help="Model name, alias, or path to a weights file."),
    download: bool = typer.Option(False, "--download", help="Download the weights if missing."),
) -> None:
    """Config, parameter count, labels and checksum of a model."""
    with errors_to_exit_codes():
        from .model import count_parameters
        from .registry import load_model, load_registry

        reg = load_registry()
        try:
            lm = load_model(model, registry=reg, download=download)
        except Exception as e:  # registry facts are still useful without weights
            if not reg.has(model):
                raise
            entry = reg.get(model)
            print(json.dumps({"name": entry.name, "variant": entry.variant, "labels": entry.labels,
                              "sources": [s.files[0].url for s in entry.sources],
                              "cached": False, "note": str(e).splitlines()[0]}, indent=2))
            return
        print(json.dumps({"name": lm.name, "path": lm.path, "sha256": lm.sha256, "format": lm.source_format,
                          "config": lm.config.to_dict(), "parameters": count_parameters(lm.model),
                          "n_labels": len(lm.labels) if lm.labels else None,
                          "first_labels": (lm.labels or [])[:5]}, indent=2))


# ------------------------------------------------------------------ extract
# (extract command goes here)

# ------------------------------------------------------------------ prepare-mels
# (prepare-mels command goes here)

# ------------------------------------------------------------------ train
# (train command goes here)

# ------------------------------------------------------------------ probe
# (probe command goes here)

# ------------------------------------------------------------------ bench

@app.command()
def bench(
    model_only: bool = typer.Option(False, "--model-only", help="Time the transformer alone on random input."),
    model: Optional[str] = typer.Option(None, help="Model name or path; default: random weights of --variant."),
    variant: str = typer.Option("30s", help="Segment length of the random-weight model: 5s, 10s, 20s, 30s."),
    block: int = typer.Option(7, help="Stop after this block (0: all blocks and the classifier head)."),
    presets: str = typer.Option("none,fast,faster,fastest", help="Comma-separated patchout presets."),
    dtype: str = typer.Option("auto", help="auto, fp32, bf16 (auto: bf16 only where the CPU runs it natively)."),
    repeats: int = typer.Option(5, help="Timed repeats per point (median and spread are reported)."),
    out: Optional[Path] = typer.Option(None, help="Write the results as JSON here."),
) -> None:
    """Audio-minutes per second of each preset (model only: `--model-only`)."""
    with errors_to_exit_codes():
        if not model_only:
            from .runtime import UsageError

            raise UsageError("only `maest bench --model-only` exists so far")
        from .bench import run_model_bench

        result = run_model_bench(model=model, variant=variant, block=block or None,
                                 presets=[p for p in presets.split(",") if p], dtype=dtype, repeats=repeats)
        if out:
            out.write_text(json.dumps(result, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
