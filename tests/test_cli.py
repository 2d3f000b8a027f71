"""The command line: instant help, every command and subcommand, one error line and the right exit
code for every user error (a missing path, a file of the wrong kind, a bad option value), never a
traceback."""

import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_audio
from typer.testing import CliRunner

from maest_cli.cli.app import app
from maest_cli.models.presets import get_preset, load_presets

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["extract", "prepare-mels", "train", "probe", "tag", "similar", "index", "findings", "models", "bench",
            "corpus", "datasets"]


# ------------------------------------------------------------------ help and layout

def test_help_does_not_import_torch():
    code = ("import sys; from maest_cli.cli.app import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
            "for g in ('models', 'bench', 'corpus', 'extract', 'train', 'probe', 'tag', 'similar', 'index', 'findings',\n"
            "          'prepare-mels'):\n"
            "    r = CliRunner().invoke(app, [g, '--help']); assert r.exit_code == 0, (g, r.output)\n"
            "assert 'torch' not in sys.modules, 'torch imported by a --help'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_command_and_subcommand_is_listed():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and all(c in r.output for c in COMMANDS)
    for group, subs in (("models", ["list", "download", "info", "bundle"]), ("corpus", ["build", "info"]),
                        ("bench", ["fidelity", "mels", "train", "probe"])):
        r = runner.invoke(app, [group, "--help"])
        assert r.exit_code == 0 and all(s in r.output for s in subs), (group, r.output)


def test_subcommand_help_shows_defaults():
    r = runner.invoke(app, ["bench", "--help"])
    assert r.exit_code == 0 and "default" in r.output.lower()


def test_no_argparse_and_no_script_entry_points_in_the_package():
    for f in (ROOT / "maest_cli").rglob("*.py"):
        text = f.read_text()
        assert "argparse" not in text, f
        assert not re.search(r"^if __name__ == .__main__.:", text, re.M) or f.name == "__main__.py", f


def test_makefile_calls_the_commands_as_they_are():
    """Every `$(MAEST) ...` line of the Makefile names a command and options that exist (--help
    after them: the parser checks the names, the eager --help then exits), and no target runs a
    module of the package as a script."""
    lines = [line.strip() for line in (ROOT / "Makefile").read_text().splitlines()]
    assert not [line for line in lines if re.search(r"-m maest_cli\.", line)]
    calls = [line.split("$(MAEST) ", 1)[1] for line in lines if "$(MAEST) " in line]
    assert any(c.startswith("bench train") for c in calls) and any(c.startswith("models bundle") for c in calls)
    for call in calls:
        args = shlex.split(call.replace("$(CORPUS)", "corpus").replace("$(WORKERS)", "2"))
        r = runner.invoke(app, [*args, "--help"])
        assert r.exit_code == 0, (call, r.output)


# ------------------------------------------------------------------ commands that work

def test_extract_as_typed_writes_embeddings_in_the_working_directory(tmp_path, tiny_model_file, monkeypatch):
    import pyarrow.dataset as pads

    music = tmp_path / "music"
    music.mkdir()
    write_audio(music / "a.wav", 3.0)
    write_audio(music / "b.wav", 2.0, seed=1)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    r = runner.invoke(app, ["extract", str(music), "--patchout", "fast", "--model", tiny_model_file])
    assert r.exit_code == 0, r.output
    assert pads.dataset("embeddings").to_table().num_rows == 2
    assert r.stderr.splitlines()[-1] == "maest: output: embeddings/ (Parquet dataset)"
    r = runner.invoke(app, ["extract", str(music), "--patchout", "faster", "--model", tiny_model_file])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith("maest: error: --out embeddings ") and "--overwrite" in lines[0]


def test_models_list_json():
    r = runner.invoke(app, ["models", "list", "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.output)
    assert any(m["default"] and m["name"] == "discogs-maest-30s-pw-129e" for m in rows)


def test_models_list_table():
    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0 and "MAEST models" in r.output and "CC BY-NC-SA" in r.output


def assert_whole_names(text: str, rows: list[dict]) -> None:
    """Every name and alias a user types stands whole on one line, nothing cut with an ellipsis."""
    assert "…" not in text, text
    for word in [r["name"] for r in rows] + [a for r in rows for a in r["aliases"]]:
        assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text), f"{word!r} not whole:\n{text}"


@pytest.mark.parametrize("width", [40, 80, 120, 200])
def test_models_list_shows_whole_names_at_any_width(width):
    from rich.console import Console

    from maest_cli.cli.tables import print_models

    rows = json.loads(runner.invoke(app, ["models", "list", "--json"]).output)
    shown = io.StringIO()
    print_models(rows, "/home/someone/.cache/maest-cli", Console(file=shown, width=width))
    assert_whole_names(shown.getvalue(), rows)
    assert "MAEST models" in shown.getvalue() and "discogs400" in shown.getvalue()


def test_models_list_in_a_pipe_shows_whole_names():
    rows = json.loads(runner.invoke(app, ["models", "list", "--json"]).output)
    for columns in ("40", "80"):
        r = runner.invoke(app, ["models", "list"], env={"COLUMNS": columns})  # CliRunner's stdout is no tty
        assert r.exit_code == 0, r.output
        assert_whole_names(r.stdout, rows)


def test_models_info_local_file(tiny_model_file):
    r = runner.invoke(app, ["models", "info", tiny_model_file])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["config"]["width"] == 64 and info["n_labels"] == 10 and len(info["sha256"]) == 64


def test_models_info_without_weights_still_describes_the_model():
    r = runner.invoke(app, ["models", "info", "maest-30s"])
    assert r.exit_code == 0
    assert json.loads(r.output)["cached"] is False


def test_unknown_model_is_a_usage_error():
    r = runner.invoke(app, ["models", "info", "no-such-model"])
    assert r.exit_code == 2
    assert "unknown model 'no-such-model'" in r.output


def test_download_offline_fails_with_instructions():
    r = runner.invoke(app, ["models", "download", "maest-10s"])
    assert r.exit_code == 1
    assert "discogs-maest-10s-pw-129e-swa.ckpt" in r.output


def test_models_bundle_packages_a_run(tmp_path):
    import torch

    from maest_cli.models.checkpoints import save_checkpoint
    from maest_cli.models.maest import MAEST, tiny_config

    run = tmp_path / "run"
    torch.manual_seed(0)
    save_checkpoint(run / "best.safetensors", MAEST(tiny_config(frames=316, n_classes=3)), labels=["a", "b", "c"])
    (run / "config.resolved.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1}) + "\n")
    r = runner.invoke(app, ["models", "bundle", str(run), str(tmp_path / "w" / "mini"), "--weights", "best",
                            "--name", "mini-test"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["epochs"] == 1
    info = json.loads(runner.invoke(app, ["models", "info", str(tmp_path / "w" / "mini.safetensors")]).output)
    assert info["name"] == "mini-test" and info["n_labels"] == 3


def test_bench_model_only_runs(tmp_path):
    out = tmp_path / "b.json"
    r = runner.invoke(app, ["bench", "--model-only", "--variant", "5s", "--repeats", "1",
                            "--presets", "none,fastest", "--dtype", "fp32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    none, fastest = res["results"]
    assert fastest["gflop"] < none["gflop"] / 5
    assert res["machine"]["threads"] >= 1


def test_presets_table_and_overrides():
    table = load_presets()
    assert {"none", "fast", "faster", "fastest"} <= set(table)
    assert table["none"].patchout.is_identity
    p = get_preset("fast", time_keep_every=5)
    assert p.time_keep_every == 5 and p.drop_freq_rows == table["fast"].drop_freq_rows
    assert p.name == "fast+custom"
    from maest_cli.io.config import ConfigError

    with pytest.raises(ConfigError, match="unknown patchout preset"):
        get_preset("turbo")


def test_public_api_names_resolve():
    import maest_cli

    for name in maest_cli.__all__:
        assert getattr(maest_cli, name) is not None, name


# ------------------------------------------------------------------ user errors, command by command
# Each case: the command line ({text}: a text file, {missing}: a path that does not exist, {dir}: an
# empty directory, {audio}: a directory of one short clip, {out}: a new path, {tiny}: a tiny random
# MAEST, {run}: a run directory whose
# weights are text, {corpus}: a finished-looking corpus with no tasks), the exit code (2: usage,
# 1: inputs failed), and what the one `maest: error:` line must name.

USER_ERRORS = {
    "extract": [
        ("missing path", "extract {missing}/a.mp3 --out {out}", 2, ["{missing}/a.mp3"]),
        ("checkpoint is text", "extract {dir} --out {out} --model {text}", 2, ["{text}"]),
        ("audio is text", "extract {text} --out {out} --model {tiny} --workers 0", 1, ["{text}"]),
        ("bad --pool", "extract {dir} --out {out} --pool bogus", 2, ["--pool", "bogus"]),
        ("bad --engine", "extract {dir} --out {out} --engine onnx", 2, ["--engine", "onnx"]),
        ("openvino with int8", "extract {dir} --out {out} --model {tiny} --engine openvino --patchout fast-int8", 2,
         ["--engine openvino", "int8"]),
        ("bad --workers", "extract {dir} --out {out} --workers many", 2, ["--workers"]),
    ],
    "prepare-mels": [
        ("missing path", "prepare-mels {missing} --out {out}", 2, ["{missing}"]),
        ("audio root is text", "prepare-mels {text} --out {out}", 2, ["{text}"]),
        ("bad --crop", "prepare-mels {dir} --out {out} --crop middle", 2, ["--crop", "middle"]),
    ],
    "train": [
        ("missing dataset", "train --data {missing} --out {out} --config tiny", 2, ["--data", "{missing}"]),
        ("recipe is text", "train --data {dir} --out {out} --config {text}", 2, ["{text}"]),
        ("missing run", "train --resume {missing}", 2, ["--resume", "{missing}"]),
        ("bad --nproc", "train --data {dir} --out {out} --config tiny --nproc 0", 2, ["--nproc"]),
        ("bad --config", "train --data {dir} --out {out} --config nosuch", 2, ["--config", "nosuch"]),
        ("bad --config, 2 processes", "train --data {dir} --out {out} --config nosuch --nproc 2", 2,
         ["--config", "nosuch"]),
        ("dataset is text", "train --data {text} --out {out} --config tiny", 2, ["{text}"]),
        ("missing dataset, 2 processes", "train --data {missing} --out {out} --config tiny --nproc 2", 2,
         ["--data", "{missing}"]),
    ],
    "tag": [
        ("missing path", "tag {missing}/a.wav --model {tiny}", 2, ["{missing}/a.wav"]),
        ("audio is text", "tag {text} --model {tiny} --workers 0 --engine torch --out {out}", 1, ["{text}"]),
        ("audio is text, quiet", "tag {text} --model {tiny} --workers 0 --engine torch --out {out} --quiet", 1,
         ["{text}"]),
        ("dataset is empty", "tag --from {dir}", 2, ["--from", "{dir}"]),
        ("dataset is missing", "tag --from {missing}", 2, ["--from", "{missing}"]),
        ("audio and --from", "tag {audio} --from {dir}", 2, ["--from"]),
        ("checkpoint is text", "tag {audio} --model {text}", 2, ["{text}"]),
        ("bad --format", "tag {audio} --format xml", 2, ["--format", "xml"]),
        ("bad --top", "tag {audio} --model {tiny} --top 0", 2, ["--top"]),
        ("bad --threshold", "tag {audio} --model {tiny} --threshold 2", 2, ["--threshold"]),
        ("bad --patchout", "tag {audio} --patchout turbo", 2, ["turbo"]),
    ],
    "similar": [
        ("missing dataset", "similar {audio}/clip.wav --dataset {missing}", 2, ["--dataset", "{missing}"]),
        ("dataset is a file", "similar {audio}/clip.wav --dataset {text}", 2, ["--dataset", "{text}"]),
        ("dataset is empty", "similar {audio}/clip.wav --dataset {dir}", 2, ["--dataset", "{dir}"]),
        ("no query", "similar --dataset {dir}", 2, ["QUERY"]),
        ("query with --duplicates", "similar {audio}/clip.wav --duplicates --dataset {dir}", 2, ["--duplicates"]),
        ("bad --format", "similar {audio}/clip.wav --dataset {dir} --format xml", 2, ["--format", "xml"]),
        ("bad -k", "similar {audio}/clip.wav --dataset {dir} -k 0", 2, ["-k"]),
        ("bad --threshold", "similar --duplicates --dataset {dir} --threshold 2", 2, ["--threshold"]),
    ],
    "index build": [
        ("missing dataset", "index build {missing}", 2, ["{missing}"]),
        ("dataset is a file", "index build {text}", 2, ["{text}"]),
        ("dataset is empty", "index build {dir}", 2, ["{dir}"]),
        ("bad --normalisation", "index build {dir} --normalisation zca", 2, ["--normalisation", "zca"]),
        ("bad --dims", "index build {dir} --normalisation whitened --dims 1", 2, ["--dims"]),
        ("bad --connectivity", "index build {dir} --connectivity 0", 2, ["--connectivity"]),
    ],
    "probe": [
        ("missing labels", "probe custom --dataset-root {missing}.tsv --embeddings {dir}", 2, ["{missing}.tsv"]),
        ("labels are text", "probe custom --dataset-root {text} --embeddings {dir}", 2, ["{text}"]),
        ("results are text", "probe --compare {text}", 2, ["{text}"]),
        ("missing results", "probe --compare {missing}.json", 2, ["{missing}.json"]),
        ("bad --tokens", "probe custom --dataset-root {text} --audio-root {dir} --tokens cls,foo", 2, ["--tokens"]),
        ("bad --grid", "probe custom --dataset-root {text} --embeddings {dir} --grid huge", 2, ["--grid", "huge"]),
        ("dataset not downloaded", "probe mtt --data-root {missing}", 2,
         ["maest datasets download mtt --root {missing}"]),
        ("custom is never downloaded", "probe custom", 2, ["--dataset-root"]),
        ("--data-root with --embeddings", "probe mtt --data-root {dir} --embeddings {dir} --dataset-root {dir}", 2,
         ["--data-root"]),
    ],
    "bench": [
        ("missing audio", "bench --audio {missing} --model {tiny} --baseline none --presets none --repeats 1", 2,
         ["{missing}"]),
        ("checkpoint is text", "bench --model {text} --baseline none --presets none --repeats 1", 2, ["{text}"]),
        ("out is a directory", "bench --out {dir} --model {tiny} --presets none", 2, ["--out", "{dir}"]),
        ("bad --presets", "bench --presets turbo --variant 5s", 2, ["turbo"]),
        ("bad --repeats", "bench --model {tiny} --baseline none --presets none --repeats 0", 2, ["--repeats"]),
        ("audio is text", "bench --model {tiny} --audio {text} --presets none --repeats 1 --baseline none", 2,
         ["{text}"]),
    ],
    "bench fidelity": [
        ("missing corpus", "bench fidelity --corpus {missing} --songs 0 --model {tiny} --no-timing", 2, ["{missing}"]),
        ("checkpoint is text", "bench fidelity --corpus {audio} --songs 0 --model {text}", 2, ["{text}"]),
        ("corpus is a file", "bench fidelity --corpus {text} --songs 1 --min-s 1 --max-s 1 --model {tiny}", 2,
         ["{text}"]),
        ("corpus is text", "bench fidelity --corpus {text} --songs 0 --model {tiny} --no-timing", 2, ["{text}"]),
        ("bad --threads", "bench fidelity --corpus {dir} --threads two", 2, ["--threads", "two"]),
        ("bad --random-weights", "bench fidelity --corpus {dir} --songs 0 --random-weights 7s", 2,
         ["--random-weights", "7s"]),
        ("bad --min-s", "bench fidelity --corpus {out} --songs 1 --min-s 5 --max-s 1 --model {tiny}", 2, ["--min-s"]),
    ],
    "bench mels": [  # no input file: its paths are where it writes
        ("work is a file", "bench mels --work {text}", 2, ["--work", "{text}"]),
        ("out is a directory", "bench mels --out {dir}", 2, ["--out", "{dir}"]),
        ("out under a file", "bench mels --out {text}/mels.json", 2, ["--out", "{text}"]),
        ("bad --formats", "bench mels --formats wav", 2, ["--formats", "wav"]),
        ("bad --workers", "bench mels --workers one,two", 2, ["--workers"]),
        ("bad --files", "bench mels --files 1", 2, ["--files"]),
    ],
    "bench train": [  # no input file: its path is where it writes
        ("out is a directory", "bench train --out {dir}", 2, ["--out", "{dir}"]),
        ("out under a file", "bench train --out {text}/train.json", 2, ["--out", "{text}"]),
        ("bad --variant", "bench train --variant 7s", 2, ["--variant", "7s"]),
        ("bad --dtype", "bench train --dtype int8", 2, ["--dtype", "int8"]),
        ("bad --drop-time", "bench train --variant 5s --drop-time 999", 2, ["--drop-time"]),
    ],
    "bench probe": [
        ("missing grid", "bench probe --grid {missing}.toml --work {out}", 2, ["{missing}.toml"]),
        ("grid is text", "bench probe --grid {text} --work {out}", 2, ["{text}"]),
        ("work is a file", "bench probe --work {text}", 2, ["--work", "{text}"]),
        ("bad --tracks", "bench probe --tracks 5", 2, ["--tracks"]),
    ],
    "datasets list": [
        ("root is a file", "datasets list --root {text}", 2, ["--root", "{text}"]),
        ("bad --json", "datasets list --json=yes", 2, ["--json"]),
    ],
    "datasets download": [  # MAEST_OFFLINE is set in tests: a download that must fetch names the fix
        ("offline", "datasets download mtt --root {out}", 1, ["MAEST_OFFLINE", "maest datasets download mtt --root"]),
        ("root is a file", "datasets download mtt --root {text}", 2, ["--root", "{text}"]),
        ("bad dataset", "datasets download msd --root {out}", 2, ["msd", "mtt, mtg-jamendo"]),
        ("bad --tars", "datasets download mtg-jamendo --tars 5-100 --root {out}", 2, ["--tars 5-100", "0-99"]),
        ("bad --quality", "datasets download mtg-jamendo --quality best --root {out}", 2, ["--quality best"]),
        ("--tars for mtt", "datasets download mtt --tars 0-9 --root {out}", 2, ["--tars"]),
    ],
    "datasets info": [
        ("root is a file", "datasets info mtt --root {text}", 2, ["--root", "{text}"]),
        ("bad dataset", "datasets info magna --root {dir}", 2, ["magna"]),
    ],
    "models list": [
        ("missing registry", "models list", 2, ["{missing}.toml"], {"MAEST_REGISTRY": "{missing}.toml"}),
        ("registry is text", "models list", 2, ["{text}"], {"MAEST_REGISTRY": "{text}"}),
        ("bad --json", "models list --json=yes", 2, ["--json"]),
    ],
    "models download": [
        ("missing registry", "models download maest-30s", 2, ["{missing}.toml"], {"MAEST_REGISTRY": "{missing}.toml"}),
        ("registry is text", "models download", 2, ["{text}"], {"MAEST_REGISTRY": "{text}"}),
        ("unknown model", "models download maest-7s", 2, ["maest-7s"]),
    ],
    "models info": [
        ("missing file", "models info {missing}.safetensors", 2, ["{missing}.safetensors"]),
        ("weights are text", "models info {text}", 2, ["{text}"]),
        ("unknown model", "models info no-such-model", 2, ["no-such-model"]),
    ],
    "models bundle": [
        ("missing run", "models bundle {missing} {out}/b", 2, ["{missing}"]),
        ("run is a file", "models bundle {text} {out}/b", 2, ["{text}"]),
        ("weights are text", "models bundle {run} {out}/b", 2, ["swa.safetensors"]),
        ("bad --weights", "models bundle {run} {out}/b --weights worst", 2, ["--weights", "worst"]),
    ],
    "corpus build": [
        ("missing config", "corpus build {out} --config {missing}.toml", 2, ["{missing}.toml"]),
        ("missing soundfont", "corpus build {out} --clips 4 --soundfont {missing}.sf2", 2, ["{missing}.sf2"]),
        ("config is text", "corpus build {out} --config {text}", 2, ["{text}"]),
        ("folder is a file", "corpus build {text} --clips 4", 2, ["{text}"]),
        ("bad --clips", "corpus build {out} --clips -3", 2, ["--clips"]),
    ],
    "corpus info": [
        ("missing corpus", "corpus info {missing}", 2, ["{missing}"]),
        ("corpus is a file", "corpus info {text}", 2, ["{text}"]),
        ("bad option", "corpus info {dir} --tables", 2, ["--tables"]),
    ],
    "export": [
        ("missing model", "export {missing}.safetensors --out {out}.onnx", 2, ["{missing}.safetensors"]),
        ("checkpoint is text", "export {text} --out {out}.onnx", 2, ["{text}"]),
        ("out is a directory", "export {tiny} --out {dir}", 2, ["--out", "{dir}"]),
        ("out in a missing folder", "export {tiny} --out {missing}/m.onnx", 2, ["--out", "{missing}"]),
        ("out under a file", "export {tiny} --out {text}/m.xml --format openvino", 2, ["--out", "{text}"]),
        ("bad --format", "export {tiny} --out {out}.onnx --format tflite", 2, ["--format", "tflite"]),
        ("bad --patchout (int8)", "export {tiny} --out {out}.onnx --patchout none-int8", 2,
         ["--patchout", "none-int8"]),
        ("bad --block", "export {tiny} --out {out}.onnx --block 9", 2, ["--block"]),
    ],
    "findings": [
        ("missing model", "findings {out} --corpus {corpus} --model {missing}.safetensors", 2,
         ["{missing}.safetensors"]),
        ("corpus is a file", "findings {out} --corpus {text}", 2, ["{text}"]),
        ("effnet is text", "findings {out} --corpus {corpus} --effnet {text}", 2, ["{text}"]),
        ("bad --jobs", "findings {out} --corpus {corpus} --jobs 0", 2, ["jobs"]),
        ("bad --presets", "findings {out} --corpus {corpus} --presets turbo", 2, ["--presets", "turbo"]),
        ("bad --engine", "findings {out} --corpus {corpus} --engine tpu", 2, ["--engine", "tpu"]),
    ],
}

CASES = [pytest.param(command, *case, *[None] * (5 - len(case)), id=f"{command}: {case[0]}")
         for command, cases in USER_ERRORS.items() for case in cases]



@pytest.fixture
def paths(tmp_path, tiny_model_file):
    from maest_cli.demo.corpus import FORMAT, MANIFEST

    text = tmp_path / "notes.txt"
    text.write_text("not what was asked for\n")
    (tmp_path / "empty").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    for name in ("swa.safetensors", "config.resolved.json", "metrics.jsonl"):
        (run / name).write_text("not what was asked for\n")
    (tmp_path / "audio").mkdir()
    write_audio(tmp_path / "audio" / "clip.wav", 1.0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / MANIFEST).write_text(json.dumps({"format": FORMAT, "tasks": {}, "files": {}}))
    return {"text": str(text), "missing": str(tmp_path / "missing"), "dir": str(tmp_path / "empty"),
            "audio": str(tmp_path / "audio"), "out": str(tmp_path / "new"), "tiny": tiny_model_file, "run": str(run),
            "corpus": str(corpus)}


def check_user_error(args: list[str], code: int, names: list[str], env: dict | None = None):
    r = runner.invoke(app, args, env=env)
    shown = f"maest {shlex.join(args)}\n{r.output}"
    assert isinstance(r.exception, SystemExit), f"{shown}\n{r.exception!r}"
    assert "Traceback" not in r.output, shown
    assert r.exit_code == code, shown
    errors = [line for line in r.stderr.splitlines() if line.startswith("maest: error: ")]
    assert len(errors) == 1, shown
    for name in names:
        assert name in errors[0], f"{name!r} not named: {shown}"


@pytest.mark.parametrize("command, what, line, code, names, env", CASES)
def test_user_error(paths, command, what, line, code, names, env):
    fill = lambda s: s.format(**paths)  # noqa: E731
    check_user_error([fill(a) for a in shlex.split(line)], code, [fill(n) for n in names],
                     {k: fill(v) for k, v in env.items()} if env else None)


def test_every_command_is_tried_with_user_errors():
    from typer.main import get_command

    def leaves(cmd, prefix=()):
        subs = getattr(cmd, "commands", None)
        if not subs:
            return [" ".join(prefix)]
        own = [" ".join(prefix)] if prefix and getattr(cmd, "invoke_without_command", False) else []
        return own + [leaf for name, sub in subs.items() for leaf in leaves(sub, (*prefix, name))]

    assert sorted(leaves(get_command(app))) == sorted(USER_ERRORS)
    for command, cases in USER_ERRORS.items():  # a path and a bad value at least, each
        assert any("{" in line or env for _, line, *_, env in [(*c, *[None] * (5 - len(c))) for c in cases]), command
        assert any(what.startswith("bad ") or what == "unknown model" for what, *_ in cases), command


# ------------------------------------------------------------------ the one error mapping

def test_errors_map_to_exit_codes_in_one_place(monkeypatch):
    import maest_cli.models.registry as registry
    from maest_cli.errors import MaestError, UsageError

    for raised, code, line in ((UsageError("--thing: bad"), 2, "maest: error: --thing: bad"),
                               (MaestError("3 files failed"), 1, "maest: error: 3 files failed"),
                               (PermissionError(13, "Permission denied", "/x/y"), 1, "maest: error: [Errno 13] "
                                                                                      "Permission denied: '/x/y'"),
                               (KeyboardInterrupt(), 130, "maest: interrupted")):
        def boom(*a, raised=raised, **k):
            raise raised

        monkeypatch.setattr(registry, "load_registry", boom)
        r = runner.invoke(app, ["models", "list"])
        assert r.exit_code == code and r.stderr.strip() == line and isinstance(r.exception, SystemExit), r.output


def test_a_bug_is_not_hidden(monkeypatch):
    import maest_cli.models.registry as registry

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(registry, "load_registry", bug)
    r = runner.invoke(app, ["models", "list"])
    assert isinstance(r.exception, ZeroDivisionError) and "maest: error" not in r.output


def test_parser_errors_are_one_line_too():
    r = runner.invoke(app, ["extract", "x.mp3", "--out", "o", "--bogus"])
    line = r.stderr.strip()
    assert r.exit_code == 2 and "\n" not in line and line.startswith("maest: error: No such option: --bogus") \
        and line.endswith("(see `maest extract --help`)"), r.output
    r = runner.invoke(app, ["bench", "nosuch"])
    assert r.exit_code == 2 and r.stderr.startswith("maest: error: No such command 'nosuch'"), r.output
    r = runner.invoke(app, [])
    assert r.exit_code == 2 and "Usage" in r.output and "maest: error" not in r.output
