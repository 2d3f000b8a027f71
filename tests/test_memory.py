"""Bounded memory in CI: the peak RSS of `extract` does not grow with the length of a file.

Each length runs in a fresh process (a peak RSS never goes down, so one process cannot measure
two runs); both run at once, one torch thread each. The 60-minute full-size run in
test_extract.py stays a slow benchmark; this is the cheap proof that runs every time.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import soundfile as sf
import torch
from conftest import tone_mix

from maest_cli.models.checkpoints import save_checkpoint
from maest_cli.models.maest import MAEST, tiny_config

REPO = Path(__file__).resolve().parents[1]
SR = 22050  # not 16 kHz, so the resampler runs too; mono keeps the files quick to write
MINUTES = (10, 30)
# Measured (15 runs of 10, 20 and 30 minutes, tiny model, workers 0): peaks of 355-358 MB,
# flat within 2 MB. Keeping every segment costs ~3.3 MB per minute, keeping the whole
# log-mel ~1.4 MB per minute (whole 16 kHz audio ~3.8): over 20 extra minutes those are 66,
# 29 and 77 MB. 20 MB catches all of them and is ten times the noise.
MARGIN_MB = 20.0

CHILD = """
import json, sys
from maest_cli.embed.extraction import extract
s = extract([sys.argv[1]], sys.argv[2], model=sys.argv[3], workers=0, threads=1, progress=False)
print(json.dumps(s.to_dict()))
"""


def _write_flac(path: Path, minutes: int) -> Path:
    """Generated audio written 10 s at a time, so the test itself never holds a long signal."""
    with sf.SoundFile(path, "w", SR, 1, format="FLAC", subtype="PCM_16") as f:
        for i in range(minutes * 6):
            f.write(tone_mix(10.0, SR, seed=i, channels=1))
    return path


def test_peak_rss_of_extract_does_not_grow_with_file_length(tmp_path):
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "tiny.safetensors", MAEST(tiny_config(frames=316, n_classes=10)),
                            labels=[f"tag{i}" for i in range(10)])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MAEST_OFFLINE="1",
               MAEST_CACHE=str(tmp_path / "cache"))
    runs = {}
    for minutes in MINUTES:
        audio = _write_flac(tmp_path / f"{minutes}min.flac", minutes)
        cmd = [sys.executable, "-c", CHILD, str(audio), str(tmp_path / f"out{minutes}"), str(model)]
        runs[minutes] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    summaries = {}
    for minutes, proc in runs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        summaries[minutes] = json.loads(out.splitlines()[-1])
    short, long = (summaries[m] for m in MINUTES)
    for m, s in summaries.items():
        assert (s["n_done"], s["n_failed"]) == (1, 0) and abs(s["audio_seconds"] - m * 60) < 1.0, s
    assert long["n_segments"] > 2.9 * short["n_segments"]  # the long file really went through
    growth = long["peak_rss_mb"] - short["peak_rss_mb"]
    print(f"peak RSS {short['peak_rss_mb']:.1f} MB ({MINUTES[0]} min), {long['peak_rss_mb']:.1f} MB "
          f"({MINUTES[1]} min): {growth:+.1f} MB")
    assert growth < MARGIN_MB, (short["peak_rss_mb"], long["peak_rss_mb"])
