"""The command line: instant help, defaults shown, exit codes, models and bench commands."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from maest_cli.cli.app import app
from maest_cli.models.presets import get_preset, load_presets

runner = CliRunner()


def test_help_does_not_import_torch():
    code = ("import sys; from maest_cli.cli.app import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch imported by --help'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_subcommand_help_shows_defaults():
    r = runner.invoke(app, ["bench", "--help"])
    assert r.exit_code == 0 and "default" in r.output.lower()


def test_models_list_json():
    r = runner.invoke(app, ["models", "list", "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.output)
    assert any(m["default"] and m["name"] == "discogs-maest-30s-pw-129e" for m in rows)


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
