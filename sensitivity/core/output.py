"""The output layer every job writes through: atomic files, locked directories, resume by spec, manifests.

* :func:`atomic_write_text` writes a file through a temporary file in the same directory (flushed and fsynced),
  renamed into place, then fsyncs the directory: readers and killed runs see the old or the new content, never half.
* :class:`OutputDir` is a job's output directory: locked against a second writer (an advisory ``flock`` on the
  directory itself, released by the kernel when the process dies, so a killed run never leaves a stale lock), and
  resumable only by the same spec: a directory holding another job's or another spec's output is refused.
* :func:`publish_dir` writes a directory that must appear whole (a pruned checkpoint, an explanation) into a locked
  staging sibling and renames it into place.

Every manifest records the job, its full spec, the seed, the package versions and a status.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["MANIFEST", "OutputDir", "OutputError", "atomic_write_text", "check_publish", "publish_dir", "versions",
           "write_manifest"]

MANIFEST = "manifest.json"
_PACKAGES = ("sensitivity", "torch", "transformers", "tokenizers", "captum", "pandas", "numpy", "scipy", "pydantic")


class OutputError(ValueError):
    """An output location that cannot be written: another writer holds it, it holds something else, or it is not a
    directory."""


def shown(path: Path) -> str:
    """A path as messages show it: relative to the working directory when inside it, else absolute."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers, plus Python's."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temporary file in the same directory, fsynced, renamed into place,
    then the directory fsynced."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_manifest(path: str | os.PathLike, manifest: dict) -> None:
    """Write a run manifest as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str) + "\n")


def _lock(path: Path) -> int:
    """An exclusive, non-blocking ``flock`` on directory ``path``; returns the descriptor that holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"{shown(path)} is being written by another process; wait for it to finish or choose "
                          "another directory") from None  # fmt: skip
    return fd


def _identity(spec: dict) -> dict:
    """What must match for a run to resume another: the spec without where it writes."""
    return {k: v for k, v in spec.items() if k != "out"}


class OutputDir:
    """A job's output directory, locked for the duration of a ``with`` block.

    On entry the directory is created (with its parents), locked, and checked: empty, or holding a manifest of the
    same job and spec (a resume: ``previous`` is that manifest). Another job's or another spec's output is refused,
    unless ``overwrite``, which empties a directory that holds a sensitivity output (never anything else).

    Args:
        path: The directory.
        job: The job's name (``probe``, ``report``...).
        spec: The job's full spec as plain data (``Spec.to_dict()``); stored in the manifest.
        inputs: Fingerprints of inputs the spec does not name (e.g. the SHA-256 of windows passed in by a caller);
            stored, and a resume must match them too.
        overwrite: Empty a directory holding a sensitivity output of another job or spec.

    Example:
        >>> with OutputDir("runs/p", "probe", spec.to_dict()) as out:
        ...     out.write_text("probes.csv", text)
        ...     out.manifest(status="complete")
    """

    def __init__(self, path: str | os.PathLike, job: str, spec: dict, *, inputs: dict | None = None,
                 overwrite: bool = False) -> None:  # fmt: skip
        self.path = Path(path).expanduser().absolute()
        self.job, self.spec, self.inputs, self.overwrite = job, spec, dict(inputs or {}), overwrite
        self.previous: dict | None = None
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> OutputDir:
        path = self.path
        if path.exists() and not path.is_dir():
            raise OutputError(f"{shown(path)} is a file; give a directory")
        self._created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create directory {shown(path)}: {e.strerror}") from None
        self._fd = _lock(path)
        try:
            self._check()
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise
        return self

    def _check(self) -> None:
        manifest = self.path / MANIFEST
        old = _read_manifest(manifest)
        if old is None:
            if any(p.name != MANIFEST for p in self.path.iterdir()):
                raise OutputError(f"{shown(self.path)} is not empty and holds no sensitivity output; give a new or "
                                  "empty directory")  # fmt: skip
            return
        same = old.get("job") == self.job and _identity(old.get("spec") or {}) == _identity(self.spec)
        if same and (old.get("inputs") or {}) != self.inputs:
            if not self.overwrite:
                raise OutputError(f"{shown(self.path)} holds a {self.job} run on other inputs "
                                  f"({', '.join(self.inputs)}); use another directory, or overwrite to start it "
                                  "again")  # fmt: skip
            same = False
        if same:
            self.previous = old
            return
        if not self.overwrite:
            if old.get("job") != self.job:
                raise OutputError(f"{shown(self.path)} holds the output of a {old.get('job')!r} job, not "
                                  f"{self.job!r}; use another directory")  # fmt: skip
            diff = sorted(k for k in set(_identity(old.get("spec") or {})) | set(_identity(self.spec))
                          if (old.get("spec") or {}).get(k) != self.spec.get(k))  # fmt: skip
            raise OutputError(f"{shown(self.path)} holds a {self.job} run with other settings ({', '.join(diff)}); use "
                              "another directory, or overwrite to start it again")  # fmt: skip
        for child in self.path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    def __exit__(self, kind, value, traceback) -> None:
        if self._fd is not None:
            if kind is not None and self._created and not any(self.path.iterdir()):
                self.path.rmdir()  # a run that failed before writing anything leaves no trace
            os.close(self._fd)  # releases the lock
            self._fd = None

    def file(self, name: str) -> Path:
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        """Write ``text`` to ``name`` inside the directory, atomically."""
        atomic_write_text(self.path / name, text)
        return self.path / name

    def manifest(self, **fields) -> dict:
        """Write ``manifest.json``: job, spec, versions and ``fields`` (e.g. status, timings), atomically."""
        record = {"job": self.job, "spec": self.spec, **({"inputs": self.inputs} if self.inputs else {}), **fields}
        record.setdefault("versions", versions())
        write_manifest(self.path / MANIFEST, record)
        return record


def _read_manifest(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise OutputError(f"{shown(path)} is not a readable manifest (invalid JSON); move it away or use another "
                          "directory") from None  # fmt: skip
    return record if isinstance(record, dict) else None


@contextlib.contextmanager
def publish_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory that must appear whole: yields a locked staging sibling (``.NAME.tmp``), then renames it
    to ``out``. A second process publishing the same ``out`` meanwhile gets an :class:`OutputError`; a killed run
    leaves only the staging directory, which the next run clears.

    Raises:
        OutputError: ``out`` is a file, a non-empty directory (without ``overwrite``), its parent is missing, or
            another process is writing it.
    """
    out = Path(out).expanduser().absolute()
    check_publish(out, overwrite)
    stage = out.with_name(f".{out.name}.tmp")
    stage.mkdir(exist_ok=True)
    fd = _lock(stage)
    try:
        for child in stage.iterdir():  # leftovers of a killed run
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        yield stage
        check_publish(out, overwrite)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
        _fsync_dir(out.parent)
    finally:
        os.close(fd)
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def check_publish(out: Path, overwrite: bool = False) -> None:
    """Whether :func:`publish_dir` may write ``out``: a new or empty directory (any directory with ``overwrite``) in
    an existing parent."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{shown(out)} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{shown(out)} is not empty; choose another directory or overwrite it")
    if not out.parent.is_dir():
        raise OutputError(f"the parent directory of {shown(out)} does not exist")
