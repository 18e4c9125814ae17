"""Verified files (pyrovae.files) and model files: whole and verified, or refused by name."""

import json

import numpy as np
import pytest
import torch

import pyrovae
from pyrovae import files
from pyrovae.files import FileFormatError, ModelFileError


@pytest.fixture(scope="module")
def saved(sim, tmp_path_factory):
    """A small fitted model and the bytes of its file."""
    model = pyrovae.fit(sim.copy(), "nb", max_epochs=2, kl_warmup_epochs=1, progress=False)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    model.save(path)
    return model, path, path.read_bytes()


def _load(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return pyrovae.load(path)


def test_a_round_trip_is_exact_and_the_header_states_the_content(saved, sim):
    model, path, raw = saved
    assert raw.startswith(files.MAGIC)
    header = json.loads(raw[len(files.MAGIC):raw.index(b"\n", len(files.MAGIC))])
    assert header["format"] == "pyrovae-model" and header["format_version"] == files.MODEL_FORMAT_VERSION
    assert header["size"] == len(raw) - raw.index(b"\n", len(files.MAGIC)) - 1
    loaded = pyrovae.load(path, sim)
    np.testing.assert_array_equal(loaded.get_latent(sim), model.get_latent(sim))


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75, 0.999])
def test_a_flipped_byte_anywhere_in_the_content_is_refused(saved, tmp_path, where):
    _, _, raw = saved
    damaged = bytearray(raw)
    damaged[int(len(raw) * where)] ^= 0x10
    with pytest.raises(ModelFileError, match=r"bad\.pt.*(corrupted|damaged header)"):
        _load(tmp_path, "bad.pt", bytes(damaged))


@pytest.mark.parametrize("cut", [3, 40, 0.5, -1])
def test_a_truncated_file_is_refused(saved, tmp_path, cut):
    _, _, raw = saved
    n = int(len(raw) * cut) if isinstance(cut, float) else cut if cut > 0 else len(raw) + cut
    with pytest.raises(ModelFileError, match=r"cut\.pt.*truncated"):
        _load(tmp_path, "cut.pt", raw[:n])


def test_empty_text_foreign_missing_and_folder_are_named(saved, tmp_path):
    with pytest.raises(ModelFileError, match=r"empty\.pt.*empty \(0 bytes\)"):
        _load(tmp_path, "empty.pt", b"")
    with pytest.raises(ModelFileError, match=r"text\.pt.*not a model file written by pyrovae: it is a text file"):
        _load(tmp_path, "text.pt", b"gene,count\nCD3E,4\n")
    with pytest.raises(ModelFileError, match=r"noise\.pt.*binary file"):
        _load(tmp_path, "noise.pt", bytes(range(256)))
    with pytest.raises(ModelFileError, match=r"nothing\.pt.* does not exist"):
        pyrovae.load(tmp_path / "nothing.pt")
    with pytest.raises(ModelFileError, match="is a folder"):
        pyrovae.load(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match=r"other\.pt.*not a model saved by pyrovae"):
        pyrovae.load(tmp_path / "other.pt")


def test_a_newer_format_version_says_so(saved, tmp_path):
    model, _, _ = saved
    content = torch.load(files.io.BytesIO(saved[2][saved[2].index(b"\n", 8) + 1:]), weights_only=True)
    files.write_verified(tmp_path / "new.pt", content, format="pyrovae-model",
                         format_version=files.MODEL_FORMAT_VERSION + 1)
    with pytest.raises(ModelFileError, match="newer pyrovae.*format version 2.*upgrade"):
        pyrovae.load(tmp_path / "new.pt")


def test_a_file_missing_a_key_or_with_wrong_weights_is_refused(saved, tmp_path):
    content = torch.load(files.io.BytesIO(saved[2][saved[2].index(b"\n", 8) + 1:]), weights_only=True)
    partial = {k: v for k, v in content.items() if k != "state_dict"}
    files.write_verified(tmp_path / "partial.pt", partial, format="pyrovae-model", format_version=1)
    with pytest.raises(ModelFileError, match=r"partial\.pt.*lacks 'state_dict'"):
        pyrovae.load(tmp_path / "partial.pt")
    wrong = {**content, "state_dict": {k: v[..., :1] if v.ndim else v for k, v in content["state_dict"].items()}}
    files.write_verified(tmp_path / "wrong.pt", wrong, format="pyrovae-model", format_version=1)
    with pytest.raises(ModelFileError, match=r"wrong\.pt.*weights do not match"):
        pyrovae.load(tmp_path / "wrong.pt")


def test_a_model_saved_before_files_had_a_header_loads_with_a_warning(saved, sim, tmp_path):
    model, _, raw = saved
    content = torch.load(files.io.BytesIO(raw[raw.index(b"\n", 8) + 1:]), weights_only=True)
    torch.save(content, tmp_path / "old.pt")  # the layout of earlier pyrovae versions
    with pytest.warns(UserWarning, match="without verifying"):
        old = pyrovae.load(tmp_path / "old.pt")
    np.testing.assert_array_equal(old.get_latent(sim), model.get_latent(sim))


def test_a_failed_save_keeps_the_previous_file(saved, tmp_path, monkeypatch):
    model, _, _ = saved
    path = tmp_path / "model.pt"
    model.save(path)
    before = path.read_bytes()

    def full(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        model.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_save_refuses_a_path_it_cannot_write(saved, tmp_path):
    model, _, _ = saved
    with pytest.raises(ValueError, match="folder .* does not exist"):
        model.save(tmp_path / "missing" / "model.pt")
    with pytest.raises(ValueError, match="is a folder"):
        model.save(tmp_path)


def test_every_error_is_a_file_format_error_and_a_value_error():
    assert issubclass(ModelFileError, FileFormatError) and issubclass(FileFormatError, ValueError)
    assert issubclass(pyrovae.checkpoint.CheckpointError, FileFormatError)
