"""Decoding every supported format, resampling, excerpts, and one error type for bad audio."""

import os

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import tone_mix, write_audio

from maest_cli.audio.decode import AudioError, audio_info, downmix, iter_audio, load_audio
from maest_cli.audio.frontend import file_mel, mel_frontend


@pytest.mark.parametrize("ext", [".wav", ".flac", ".ogg", ".opus", ".mp3"])
def test_decodes_every_format_to_16k_mono(tmp_path, ext):
    path = write_audio(tmp_path / f"a{ext}", 2.0)
    x = load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) / 16000 - 2.0) < 0.1  # codecs pad a little
    assert np.abs(x).max() > 0.05


def test_resampling_matches_soxr_one_shot(tmp_path):
    audio = tone_mix(7.3, 44100)
    path = tmp_path / "a.wav"
    sf.write(path, audio, 44100, subtype="FLOAT")
    ref = soxr.resample(audio.mean(1), 44100, 16000, quality="HQ")
    ours = load_audio(path)
    assert len(ours) == len(ref)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_16k_input_is_not_resampled(tmp_path):
    audio = tone_mix(1.0, 16000, channels=1)[:, 0]
    sf.write(tmp_path / "a.wav", audio, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav"), audio)


def test_excerpt_equals_slice_of_whole(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, tone_mix(20.0, 44100), 44100, subtype="FLOAT")
    whole = load_audio(path)
    part = load_audio(path, start_s=5.0, duration_s=10.0)
    assert len(part) == 160_000
    np.testing.assert_allclose(part, whole[80_000:240_000], atol=2e-4)


def test_long_file_streams_in_blocks(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, tone_mix(30.0, 44100), 44100)
    blocks = list(iter_audio(path))
    assert len(blocks) > 3 and max(len(b) for b in blocks) < 16000 * 10
    assert abs(sum(map(len, blocks)) - 480_000) <= 1


def test_file_mel_equals_frontend_of_whole(tmp_path):
    path = write_audio(tmp_path / "a.ogg", 12.0)
    np.testing.assert_allclose(file_mel(path), mel_frontend(load_audio(path)).numpy(), atol=1e-4)


def test_info(tmp_path):
    info = audio_info(write_audio(tmp_path / "a.flac", 2.0))
    assert (info.sample_rate, info.channels, info.frames) == (44100, 2, 88200)


def _reason(path) -> str:
    with pytest.raises(AudioError) as e:
        load_audio(path)
    return e.value.reason


def test_latin1_file_names_decode(tmp_path):
    name = os.fsencode(tmp_path) + b"/caf\xe9.wav"
    sf.write(tmp_path / "x.wav", tone_mix(1.0, 16000), 16000)
    os.rename(tmp_path / "x.wav", name)
    assert len(load_audio(os.fsdecode(name))) == 16000


def test_mp3_without_length_header_is_not_called_truncated(tmp_path):
    """A big ID3 tag makes libsndfile's size-based length estimate far too long."""
    path = write_audio(tmp_path / "a.mp3", 3.0)
    data = open(path, "rb").read()
    # find the Xing/Info frame and blank its tag, as encoders without one would write
    data = data.replace(b"Xing", b"\0\0\0\0", 1).replace(b"Info", b"\0\0\0\0", 1)
    size = 200_000  # ID3v2 padding, syncsafe-encoded
    tag = b"ID3\x03\x00\x00" + bytes((size >> s) & 0x7F for s in (21, 14, 7, 0)) + bytes(size)
    (tmp_path / "b.mp3").write_bytes(tag + data)
    assert abs(len(load_audio(tmp_path / "b.mp3")) / 16000 - 3.0) < 0.2


def test_samples_that_overflow_the_mel_are_an_audio_error(tmp_path):
    """Finite but absurd float samples (corrupt float WAV) would give NaN embeddings."""
    x = tone_mix(2.0, 16000, channels=1)
    x[5000:5010, 0] = 1e30
    sf.write(tmp_path / "huge.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="out of range") as e:
        file_mel(tmp_path / "huge.wav")
    assert e.value.stage == "mel"


def _bad_files(tmp_path):
    good = write_audio(tmp_path / "good.mp3", 6.0)
    cases = {}
    (tmp_path / "empty.wav").write_bytes(b"")
    cases["empty.wav"] = ("empty file",)
    (tmp_path / "text.mp3").write_text("this is not audio\n" * 200)
    cases["text.mp3"] = ("not a decodable audio file",)
    (tmp_path / "notes.txt").write_text("hello")
    cases["notes.txt"] = ("unsupported extension",)
    data = open(good, "rb").read()
    (tmp_path / "truncated.mp3").write_bytes(data[: len(data) // 2])
    cases["truncated.mp3"] = ("truncated",)
    garbled = bytearray(data)
    garbled[len(data) // 3: len(data) // 3 + 3000] = os.urandom(3000)
    (tmp_path / "garbled.mp3").write_bytes(bytes(garbled))
    cases["garbled.mp3"] = ("decoding failed", "truncated")  # where mpg123 gives up
    nan = tone_mix(1.0, 16000)
    nan[8000, 0] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    cases["nan.wav"] = ("NaN or infinite",)
    (tmp_path / "dir.flac").mkdir()
    cases["dir.flac"] = ("is a directory",)
    os.symlink(tmp_path / "missing.wav", tmp_path / "dangling.wav")
    os.mkfifo(tmp_path / "fifo.wav")  # opening it would block a decoder for ever
    cases["fifo.wav"] = ("not a regular file (FIFO)",)
    cases["dangling.wav"] = ("dangling symlink",)
    return cases


def test_bad_audio_raises_audio_error_with_path_and_reason(tmp_path):
    (tmp_path / "missing.flac").unlink(missing_ok=True)
    assert "no such file" in _reason(tmp_path / "missing.flac")
    for name, reasons in _bad_files(tmp_path).items():
        path = tmp_path / name
        with pytest.raises(AudioError) as e:
            load_audio(path)
        assert e.value.path == str(path), name
        assert any(r in e.value.reason for r in reasons), (name, e.value.reason)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_unreadable_file(tmp_path):
    """chmod 000 really denies access; as root the check runs in a forked child that drops
    to 'nobody', since root reads files whatever their mode."""
    os.chmod(tmp_path, 0o755)
    path = write_audio(tmp_path / "locked.wav", 1.0)
    os.chmod(path, 0)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the reason through the pipe, never return into pytest
        try:
            if os.geteuid() == 0:
                os.setuid(65534)
            load_audio(path)
            msg = "no error"
        except AudioError as e:
            msg = e.reason
        except BaseException as e:  # noqa: BLE001
            msg = f"other error {e!r}"
        os.write(write_fd, msg.encode())
        os._exit(0)
    os.close(write_fd)
    os.waitpid(pid, 0)
    assert os.read(read_fd, 1000).decode() == "permission denied"


@pytest.mark.parametrize("channels", [1, 2, 3, 6])
def test_downmix_equals_numpy_mean(channels):
    # The column-wise downmix must give the very float32 values of block.mean(axis=1), which the
    # frontend's Essentia comparison was made with, for any channel count.
    block = np.random.default_rng(channels).standard_normal((50_000, channels)).astype(np.float32)
    mono = downmix(block)
    assert mono.dtype == np.float32 and mono.shape == (50_000,)
    np.testing.assert_array_equal(mono, block.mean(axis=1, dtype=np.float32))
