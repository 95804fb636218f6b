"""SHA-256 checksums of a folder's files, in `sha256sum` format (`cd FOLDER && sha256sum -c SHA256SUMS` checks them).

A checkpoint folder gets its SHA256SUMS just before it is renamed into place, so a complete checkpoint always has
one; readers verify the files they are about to load, and a changed, truncated or missing file is an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHECKSUM_FILE = "SHA256SUMS"
_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A file does not match its recorded checksum (or is missing); the message is one line naming it."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """SHA256SUMS over every file under `folder` (recursively, sorted), replacing an older one."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    (folder / CHECKSUM_FILE).write_text("".join(lines))


def read_checksums(folder: Path) -> dict[str, str] | None:
    """{relative path: hex digest} of a folder's SHA256SUMS, or None when it has none."""
    path = Path(folder) / CHECKSUM_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ChecksumError(f"{path} is not a SHA256SUMS file (not UTF-8 text)") from None
    sums = {}
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ChecksumError(f"{path} is not a SHA256SUMS file (line {line[:40]!r})")
        sums[name] = digest
    return sums


def verify(folder: Path, names: Iterable[str] | None = None) -> bool:
    """Check the files `names` (relative paths; default: every file listed) against the folder's SHA256SUMS.

    Returns False, checking nothing, for a folder without SHA256SUMS (written before checksums existed); raises
    ChecksumError naming the first file that is missing, unlisted or changed."""
    folder = Path(folder)
    sums = read_checksums(folder)
    if sums is None:
        return False
    for name in sums if names is None else names:
        if name not in sums:
            raise ChecksumError(f"{folder / name} is not listed in {folder / CHECKSUM_FILE}")
        path = folder / name
        if not path.is_file():
            raise ChecksumError(f"{path} is missing (listed in {CHECKSUM_FILE})")
        if sha256_file(path) != sums[name]:
            raise ChecksumError(f"{path} is corrupted: its SHA-256 differs from the one in {CHECKSUM_FILE}")
    return True
