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
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .execution import EXECUTION_FIELDS
from .spec import Spec

__all__ = ["MANIFEST", "OutputDir", "OutputError", "atomic_write_text", "atomic_write_texts", "check_dir", "check_file",
           "check_name", "check_publish", "has_manifest", "publish_dir", "starts_with", "versions", "write_manifest"]

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
    then the directory fsynced.

    Raises:
        OutputError: The directory cannot be written (naming ``path``, never the temporary file).
    """
    atomic_write_texts({path: text})


def atomic_write_texts(texts: dict[str | os.PathLike, str]) -> None:
    """Write several files so that either all appear or none does (short of a crash between the final renames):
    every temporary file is written and fsynced before the first is renamed into place.

    Raises:
        OutputError: A directory cannot be written (naming the file, never the temporary one); nothing is left.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, text in texts.items():
            path = Path(path)
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            except OSError as e:
                raise OutputError(f"cannot write {shown(path)}: {e.strerror}") from None
            staged.append((tmp, path))
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    for parent in {path.parent for _, path in staged}:
        _fsync_dir(parent)


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
    """What must match for a run to resume another: the spec without where it writes and where and how it runs
    (the execution fields; ``streamed``, which gives the same numbers)."""
    return {k: v for k, v in spec.items() if k not in ("out", "streamed") and k not in EXECUTION_FIELDS}


class OutputDir:
    """A job's output directory, locked for the duration of a ``with`` block.

    On entry the directory is created (with its parents), locked, and checked: empty, or holding a manifest of the
    same job and spec (a resume: ``previous`` is that manifest). Another job's or another spec's output is refused,
    unless ``overwrite``, which empties a directory that holds a sensitivity output (never anything else).

    Args:
        path: The directory.
        job: The job's name (``probe``, ``report``...).
        spec: The job's full spec (a :class:`~sensitivity.core.spec.Spec`, or plain data from ``Spec.to_dict()``);
            stored in the manifest. Given as a spec, an output made before a field was added resumes when the new
            field has its default.
        inputs: Fingerprints of inputs the spec does not name (e.g. the SHA-256 of windows passed in by a caller);
            stored, and a resume must match them too.
        overwrite: Empty a directory holding a sensitivity output of another job or spec.

    Attributes:
        path: The directory, absolute (``~`` expanded).
        defaults: Each field's default (:meth:`~sensitivity.core.spec.Spec.defaults`) when ``spec`` was given as a
            spec, else ``{}``; fields a resumed manifest lacks take these.
        previous: The manifest of the run this one resumes, once checked on entry; None for a new output.

    Examples:
        >>> with OutputDir("runs/p", "probe", spec.to_dict()) as out:
        ...     out.write_text("probes.csv", text)
        ...     out.manifest(status="complete")
    """

    def __init__(self, path: str | os.PathLike, job: str, spec: dict | Spec, *, inputs: dict | None = None,
                 overwrite: bool = False) -> None:  # fmt: skip
        self.defaults = spec.defaults() if isinstance(spec, Spec) else {}
        spec = spec.to_dict() if isinstance(spec, Spec) else spec
        self.path = Path(path).expanduser().absolute()
        self.job, self.spec, self.inputs, self.overwrite = job, spec, dict(inputs or {}), overwrite
        self.previous: dict | None = None
        self._fd: int | None = None
        self._created = False

    def check(self) -> OutputDir:
        """Check, without creating or changing anything, that the directory can be written by this run (jobs call
        it before loading their inputs, so bad output paths fail first and leave nothing); returns ``self``."""
        check_dir(self.path)
        if self.path.is_dir():
            self._check(dry=True)
        return self

    def __enter__(self) -> OutputDir:
        path = self.path
        check_dir(path)
        self._created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create directory {shown(path)}: {e.strerror}") from None
        self._fd = _lock(path)
        try:
            self._check()
            if self.previous is not None:
                _clear_leftovers(path)
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise
        return self

    def _check(self, dry: bool = False) -> None:
        manifest = self.path / MANIFEST
        old = _read_manifest(manifest)
        if old is None:
            if any(p.name != MANIFEST for p in self.path.iterdir()):
                raise OutputError(f"{shown(self.path)} is not empty and holds no sensitivity output; give a new or "
                                  "empty directory")  # fmt: skip
            return
        old_spec = {**self.defaults, **(old.get("spec") or {})}  # fields added since it ran: their defaults
        same = old.get("job") == self.job and _identity(old_spec) == _identity(self.spec)
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
            diff = sorted(k for k in set(_identity(old_spec)) | set(_identity(self.spec))
                          if old_spec.get(k) != self.spec.get(k))  # fmt: skip
            raise OutputError(f"{shown(self.path)} holds a {self.job} run with other settings ({', '.join(diff)}); use "
                              "another directory, or overwrite to start it again")  # fmt: skip
        if dry:
            return
        for child in self.path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    def __exit__(self, kind, value, traceback) -> None:
        if self._fd is not None:
            if kind is not None and self._created and all(p.name == MANIFEST for p in self.path.iterdir()):
                (self.path / MANIFEST).unlink(missing_ok=True)  # a run that failed before writing any output
                self.path.rmdir()  # leaves no trace (its "running" manifest had nothing to resume)
            os.close(self._fd)  # releases the lock
            self._fd = None

    @property
    def is_open(self) -> bool:
        """Whether the directory is created and locked (inside the ``with`` block)."""
        return self._fd is not None

    def file(self, name: str) -> Path:
        """The path of ``name`` inside the directory (nothing is created)."""
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


def _clear_leftovers(path: Path) -> None:
    """Remove what a killed run of this output left mid-write: ``.NAME.XXXX.tmp`` files of atomic writes and
    ``.NAME.tmp`` staging directories (the caller holds the directory's lock, so no one is writing them)."""
    for stale in sorted(path.rglob(".*.tmp"), key=lambda p: len(p.parts), reverse=True):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def check_name(path: Path) -> None:
    """Refuse a path the file system cannot hold: a name longer than its ``NAME_MAX`` (255 bytes on most) or a path
    longer than ``PATH_MAX``, before anything stats it (that raises ``File name too long``).

    Raises:
        OutputError: Naming the long piece, its length and the limit.
    """
    full = Path(path).absolute()
    ancestor = next((p for p in full.parents if _exists(p)), Path("/"))
    try:
        name_max, path_max = os.pathconf(ancestor, "PC_NAME_MAX"), os.pathconf(ancestor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in full.parts:
        if len(os.fsencode(part)) > name_max:
            raise OutputError(f"{part[:24]}... is a name of {len(os.fsencode(part))} bytes; allowed: at most "
                              f"{name_max} (the file system's limit)")  # fmt: skip
    if len(os.fsencode(str(full))) >= path_max:
        raise OutputError(f"{str(full)[:24]}... is a path of {len(os.fsencode(str(full)))} bytes; allowed: under "
                          f"{path_max} (the file system's limit)")  # fmt: skip


def check_dir(path: Path) -> None:
    """Whether ``path`` is a directory or one could be created there (with its parents), without creating it.

    Raises:
        OutputError: ``path`` is a file, or the nearest existing ancestor is not a writable directory.
    """
    check_name(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{shown(path)} is a file; allowed: a directory")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create {shown(path)}: {shown(ancestor)} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {shown(path)}: {shown(ancestor)} is not writable")


def check_file(path: Path, overwrite: bool = False, ours: Callable[[Path], str | None] | None = None) -> None:
    """Whether a file may be written at ``path``: in an existing, writable directory, and not already there unless
    ``overwrite`` and ``ours`` recognises it as this toolkit's output (an existing file is never replaced
    otherwise).

    Args:
        path: The file to write.
        overwrite: Replace an existing file that ``ours`` recognises.
        ours: ``ours(path)`` is None for a file this toolkit wrote, else what it lacks (``"the '# sparsity
            schedule' header"``); see :func:`starts_with` and :func:`has_manifest`.

    Raises:
        OutputError: Naming the path and what is wrong.
    """
    check_name(path)
    if path.is_dir():
        raise OutputError(f"{shown(path)} is a directory; allowed: a file name")
    if path.exists() and not overwrite:
        raise OutputError(f"{shown(path)} exists; choose another file or overwrite it")
    if path.exists() and (lacks := "a sign of this toolkit" if ours is None else ours(path)) is not None:
        raise OutputError(f"{shown(path)} exists and has no {lacks}: it is not an output of sensitivity, and "
                          "overwrite replaces only those; choose another file")  # fmt: skip
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise OutputError(f"cannot write {shown(path)}: {shown(parent)} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {shown(path)}: {shown(parent)} is not writable")


def starts_with(header: str) -> Callable[[Path], str | None]:
    """For :func:`check_file`: a file is this toolkit's when its text starts with ``header``."""

    def check(path: Path) -> str | None:
        try:
            with open(path, "rb") as f:
                ok = f.read(len(header.encode())) == header.encode()
        except OSError:
            ok = False
        return None if ok else f"{header.strip()!r} header"

    return check


def has_manifest(manifest: Path, job: str) -> Callable[[Path], str | None]:
    """For :func:`check_file`: a file is this toolkit's when ``manifest`` (written next to it) names ``job``."""

    def check(path: Path) -> str | None:
        try:
            record = _read_manifest(manifest)
        except OutputError:
            record = None
        return None if record is not None and record.get("job") == job else f"{shown(manifest)} naming job {job!r}"

    return check


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
def publish_dir(out: str | os.PathLike, *, overwrite: bool = False, marker: str | None = None) -> Iterator[Path]:
    """Build a directory that must appear whole: yields a locked staging sibling (``.NAME.tmp``), then renames it
    to ``out``. A second process publishing the same ``out`` meanwhile gets an :class:`OutputError`; a killed run
    leaves only the staging directory, which the next run clears.

    With ``overwrite``, a non-empty ``out`` is replaced only when it holds ``marker`` (the file that says it is
    such an output, e.g. ``pruning_manifest.json``): a directory of something else is never deleted.

    Raises:
        OutputError: ``out`` is a file, a non-empty directory (without ``overwrite``, or without ``marker``), its
            parent is missing, or another process is writing it.
    """
    out = Path(out).expanduser().absolute()
    check_publish(out, overwrite, marker)
    stage = out.with_name(f".{out.name}.tmp")
    try:
        stage.mkdir(exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {shown(out)}: {e.strerror}") from None
    try:
        fd = _lock(stage)
    except OutputError:
        raise OutputError(f"{shown(out)} is being written by another process; wait for it to finish or choose "
                          "another directory") from None  # fmt: skip
    try:
        for child in stage.iterdir():  # leftovers of a killed run
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        yield stage
        check_publish(out, overwrite, marker)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
        _fsync_dir(out.parent)
    finally:
        os.close(fd)
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def check_publish(out: Path, overwrite: bool = False, marker: str | None = None) -> None:
    """Whether :func:`publish_dir` may write ``out``: a new or empty directory in an existing parent, or with
    ``overwrite`` a directory holding ``marker`` (a non-empty directory is never replaced without one)."""
    check_name(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{shown(out)} is a file; allowed: a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{shown(out)} is not empty; choose another directory or overwrite it")
        if marker is None or not (out / marker).is_file():
            raise OutputError(f"{shown(out)} is not empty and holds no {marker or 'output of sensitivity'}; it is "
                              "never replaced, even with overwrite: choose another directory")  # fmt: skip
    if not out.parent.is_dir():
        what = "is not a directory" if out.parent.exists() else "does not exist"
        raise OutputError(f"cannot create {shown(out)}: {shown(out.parent)} {what}")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {shown(out)}: {shown(out.parent)} is not writable")
