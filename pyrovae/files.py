"""Files pyrovae writes: whole and verified, or refused by name.

Every model file (:meth:`pyrovae.VAE.save`) and checkpoint (``checkpoint=`` of
:func:`pyrovae.fit`) has the same layout:

1. the 8 bytes ``b"PYROVAE\\n"``;
2. one line of JSON, the header: ``{"format": "pyrovae-model", "format_version": 1,
   "pyrovae": "0.1.0", "size": 123456, "sha256": "..."}``;
3. ``size`` bytes of content: a torch archive of plain values and CPU tensors
   (read with ``torch.load(weights_only=True)``, which runs no code from the file).

:func:`read_verified` checks the magic bytes, the header, the format and its version,
the size and the SHA-256 of the content before it unpickles anything, so that a
truncated, flipped-byte, empty, text or foreign file raises :class:`FileFormatError`
(:class:`ModelFileError` for model files) naming the file and what is wrong with it.
:func:`write_verified` writes to a temporary file in the same folder, syncs it and
renames it over the target, so that a crash mid-write leaves the previous file whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from . import __version__

__all__ = ["FileFormatError", "ModelFileError", "check_writable", "read_verified", "write_verified"]

MAGIC = b"PYROVAE\n"
MODEL_FORMAT = "pyrovae-model"
MODEL_FORMAT_VERSION = 1
_ZIP = b"PK\x03\x04"  # a bare torch archive: a model saved before files carried a header


class FileFormatError(ValueError):
    """A file is not one pyrovae wrote, is damaged, or is of a format this pyrovae cannot read."""


class ModelFileError(FileFormatError):
    """A model file (:meth:`pyrovae.VAE.save`) is missing, damaged or of another format."""


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, a ``path`` that cannot be written (``what`` names the option)."""
    name = os.fspath(path)
    target = Path(name)
    if target.is_dir():
        raise ValueError(f"{what}={name!r} is a folder, not a file name")
    folder = target.resolve().parent
    if not folder.is_dir():
        raise ValueError(f"{what}={name!r}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{what}={name!r}: {folder if not target.exists() else name} is not writable")


def serialise(content: dict, format: str, format_version: int) -> bytes:
    """``content`` as the bytes of a verified file (magic, header, torch archive)."""
    buffer = io.BytesIO()
    torch.save(content, buffer)
    body = buffer.getvalue()
    header = {"format": format, "format_version": format_version, "pyrovae": __version__,
              "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + body


def write_verified(path: str | os.PathLike, content: dict, *, format: str,
                   format_version: int) -> None:
    """Write ``content`` to ``path`` atomically, with its size and SHA-256 in the header.

    The bytes go to a temporary file in the same folder, are flushed and synced, then the
    file is renamed over ``path``: a crash or kill at any moment leaves either the old file
    or the new one, never a part of one.
    """
    data = serialise(content, format, format_version)
    path = Path(path)
    folder = path.resolve().parent
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once the folder is synced
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def read_verified(path: str | os.PathLike, *, format: str, format_version: int,
                  required: Iterable[str] = (), what: str = "pyrovae file",
                  error: type[FileFormatError] = FileFormatError,
                  others: dict[str, str] | None = None) -> dict:
    """The content of a file :func:`write_verified` wrote, after checking it whole.

    Parameters
    ----------
    path
        The file.
    format, format_version
        The format expected and the newest version this pyrovae reads.
    required
        Keys the content must have.
    what
        How errors name the kind of file ("model file", "checkpoint").
    error
        The exception raised (a :class:`FileFormatError`).
    others
        Other formats by name, with a hint for the user (e.g. a checkpoint given to
        :func:`pyrovae.load`).

    Raises
    ------
    FileFormatError
        (``error``) naming the file and what is wrong: missing, a folder, empty, not a
        pyrovae file, a damaged header, another format, a newer format version,
        truncated, extra bytes, a checksum mismatch, or a missing key.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise error(f"{what} {name!r} does not exist")
    if os.path.isdir(name):
        raise error(f"{what} {name!r} is a folder, not a file")
    with open(name, "rb") as f:
        raw = f.read()
    if not raw:
        raise error(f"{what} {name!r} is empty (0 bytes): it was not written to the end")
    if raw.startswith(_ZIP):
        content = _legacy(raw, name, what, error)
    else:
        content = _unpack(raw, name, format, format_version, what, error, others or {})
    if not isinstance(content, dict):
        raise error(f"{what} {name!r} holds a {type(content).__name__}, not pyrovae's content")
    missing = [key for key in required if key not in content]
    if missing:
        raise error(f"{what} {name!r} lacks {', '.join(map(repr, missing))}: it is not a whole "
                    f"{format} file")
    return content


def _unpack(raw: bytes, name: str, format: str, format_version: int, what: str,
            error: type[FileFormatError], others: dict[str, str]) -> Any:
    if not raw.startswith(MAGIC):
        if MAGIC.startswith(raw):
            raise error(f"{what} {name!r} is truncated ({len(raw)} bytes, within its first line)")
        start = raw[:16]
        kind = "a text file" if _is_text(start) else "a binary file"
        raise error(f"{name!r} is not a {what} written by pyrovae: it is {kind} "
                    f"starting with {start!r}")
    line_end = raw.find(b"\n", len(MAGIC))
    if line_end < 0:
        raise error(f"{what} {name!r} is truncated: its header line is cut off")
    try:
        header = json.loads(raw[len(MAGIC):line_end])
        kind, version = header["format"], int(header["format_version"])
        size, digest = int(header["size"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError):
        raise error(f"{what} {name!r} has a damaged header: {raw[len(MAGIC):line_end][:80]!r}") from None
    if kind != format:
        hint = others.get(kind, "")
        raise error(f"{name!r} is a {kind} file, not a {format} file{hint}")
    if version > format_version:
        raise error(f"{what} {name!r} was written by a newer pyrovae ({header.get('pyrovae', '?')}, "
                    f"format version {version}; this pyrovae {__version__} reads up to "
                    f"{format_version}): upgrade pyrovae to read it")
    body = raw[line_end + 1:]
    if len(body) < size:
        raise error(f"{what} {name!r} is truncated: {len(body)} of its {size} bytes of content")
    if len(body) > size:
        raise error(f"{what} {name!r} has {len(body) - size} bytes more than the {size} its header "
                    "states: it was changed after pyrovae wrote it")
    if hashlib.sha256(body).hexdigest() != digest:
        raise error(f"{what} {name!r} is corrupted: the SHA-256 of its content does not match "
                    "its header (a changed or damaged byte); it was not loaded")
    try:
        return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as err:  # verified bytes that do not unpickle: written by something else
        raise error(f"{what} {name!r} passed its checksum but cannot be read "
                    f"({type(err).__name__}: {err})") from None


def _legacy(raw: bytes, name: str, what: str, error: type[FileFormatError]) -> Any:
    """A bare torch archive, as pyrovae wrote before files had a header (not verifiable)."""
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:
        raise error(f"{what} {name!r} is a damaged or foreign torch archive "
                    f"({type(err).__name__}: {err})") from None


def _is_text(start: bytes) -> bool:
    try:
        text = start.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)
