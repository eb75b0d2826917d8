"""Content-addressed blob store for artifacts (global models of every round).

A blob lives at DATA_DIR/artifacts/ab/cdef... named by the sha256 of its bytes.
Writes go to a temporary file in the same directory, are fsynced, then renamed
into place, so a crash leaves either the whole blob or nothing; the directory is
fsynced too so the rename itself survives power loss. Reads verify the hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tinyfleet.common.atomic_files import write_atomically


class ArtifactNotFoundError(KeyError):
    """No blob with that sha256 in the store."""


class ArtifactCorruptError(ValueError):
    """A stored blob whose bytes no longer match its name."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_sha(sha: str) -> str:
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ArtifactNotFoundError(f"not a sha256 hex digest: {sha!r}")
    return sha


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        sha = _check_sha(sha)
        return self.root / sha[:2] / sha[2:]

    def put(self, data: bytes) -> str:
        """Store bytes atomically; returns their sha256 (idempotent for equal bytes)."""
        sha = sha256_hex(data)
        target = self.path(sha)
        if target.exists() and target.stat().st_size == len(data):
            return sha
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, data)
        return sha

    def exists(self, sha: str) -> bool:
        try:
            return self.path(sha).is_file()
        except ArtifactNotFoundError:
            return False

    def size(self, sha: str) -> int:
        try:
            return self.path(sha).stat().st_size
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"no artifact {sha}") from None

    def get(self, sha: str) -> bytes:
        """The whole blob, verified against its name."""
        try:
            data = self.path(sha).read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"no artifact {sha}") from None
        if sha256_hex(data) != sha:
            raise ArtifactCorruptError(f"artifact {sha} is corrupt on disk (hash mismatch)")
        return data

    def read_range(self, sha: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) for GetArtifact's chunks, not verified here: every chunk
        names the sha256 a downloader checks the whole against (no tinyfleet agent downloads yet)."""
        try:
            with self.path(sha).open("rb") as handle:
                handle.seek(offset)
                return handle.read(length)
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"no artifact {sha}") from None
