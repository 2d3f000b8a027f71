"""The `maest` command: the Typer app, its command groups, and the one place errors become exit codes.

Each command lives in the module of its group (embedding, datasets, training, probing, models,
bench, demo); it parses options, calls the Python API and prints. The API is imported inside the
command functions, so `maest --help` is instant and never imports torch.

Exit codes: 0 success; 1 some inputs failed, or the run did (MaestError, OSError); 2 usage (a bad
option value, config, model name or input kind: UsageError, or an option the parser refuses);
130 interrupted. Every error prints as `maest: error: ...` on stderr; only a bug shows a traceback.
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from maest_cli.cli import (
    bench,
    datasets,
    demo,
    embedding,
    exporting,
    mels,
    models,
    probing,
    searching,
    tagging,
    training,
)
from maest_cli.cli.output import print_error
from maest_cli.errors import exit_code_of


def exit_status(e: BaseException) -> int:
    """Print `e` for the user and return the exit code it ends the command with; re-raise a bug."""
    if isinstance(e, typer.Exit):
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        print("maest: interrupted", file=sys.stderr, flush=True)
        return 130
    if isinstance(e, BrokenPipeError):  # `maest ... | head`: nobody reads any more
        return 1
    if isinstance(e, typer.TyperException):  # the parser's: unknown option, bad value, missing argument
        if type(e).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            ctx = getattr(e, "ctx", None)
            print_error(e.format_message() + (f" (see `{ctx.command_path} --help`)" if ctx is not None else ""))
        return e.exit_code
    code = exit_code_of(e)
    if code is None:
        raise e
    print_error(e)
    return code


class MaestGroup(TyperGroup):
    """The root command: runs a command line and maps what it raises through `exit_status`."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, windows_expand_args=True,
             **extra):
        args = sys.argv[1:] if args is None else list(args)
        try:
            with self.make_context(prog_name or "maest", args, **extra) as ctx:
                self.invoke(ctx)
            code = 0
        except BaseException as e:  # noqa: BLE001 - exit_status re-raises what it does not map
            if isinstance(e, SystemExit):
                raise
            code = exit_status(e)
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    name="maest",
    cls=MaestGroup,
    help="MAEST music embeddings: mel-spectrograms, training, extraction, probes and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)

app.command("extract")(embedding.extract_command)
app.command("prepare-mels")(mels.prepare_mels_command)
app.command("train")(training.train_command)
app.command("probe")(probing.probe_command)
app.command("tag")(tagging.tag_command)
app.command("similar")(searching.similar_command)
app.add_typer(searching.index_app, name="index")
app.add_typer(models.models_app, name="models")
app.add_typer(datasets.datasets_app, name="datasets")
app.add_typer(bench.bench_app, name="bench")
app.add_typer(demo.corpus_app, name="corpus")
app.command("findings")(demo.findings_command)
app.command("export")(exporting.export_command)


def main() -> None:
    """The `maest` console script and `python -m maest_cli`."""
    app()
