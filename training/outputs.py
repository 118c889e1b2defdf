"""Where the training commands write, checked before any work is done.

A directory output (a bundle, a routing table) is assembled beside its target and renamed into
place only once complete, so that a watcher never sees half of one. Replacing an existing output
is how a bundle is retrained in place, but only an output of the same kind is ever replaced: a
directory that is neither empty nor holds the kind's marker file, or one that holds a command's
own input, is refused rather than deleted. The staging directory and the place the old output is
moved aside to get names of their own (hidden, unique), so nothing the command did not make is
ever removed. Each run holds a lock file named like them until it finishes, so that the next run
beside the same output clears what a killed run (SIGKILL) left behind, and nothing a live run is
still writing. Checks create nothing: missing parent directories are made when the output is
written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from training.errors import OutputError

BUNDLE_MARKER = "manifest.json"
TABLE_MARKER = "outcomes.parquet"


def _no_file_above(path: Path) -> None:
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OutputError(f"{path}: {blocking} is a file, not a directory")


def _creatable_parent(path: Path) -> None:
    """The nearest existing directory above `path` is one this process may create entries in."""
    _no_file_above(path)
    existing = next(p for p in Path(os.path.abspath(path)).parents if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot create it in {existing}: permission denied")


def make_parent(path: Path) -> Path:
    """Creates the directories above an output checked before, when it is about to be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create {path.parent}: {exc.strerror or exc}") from None
    return path


def _not_an_input(path: Path, inputs: Sequence[Path]) -> None:
    resolved = path.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise OutputError(f"{path} is or holds this command's input {source}; write elsewhere")


def check_file(path: Path, inputs: Sequence[Path] = ()) -> Path:
    """A file output: not a directory, not one of the command's inputs nor inside one, in a
    directory that exists or can be made."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give the path of a file to write")
    _not_an_input(path, inputs)
    _creatable_parent(path)
    return path


def writable_dir(path: Path) -> Path:
    """A directory that files are written into (a report): not a file, nor under one. Made by
    whoever writes into it, once there is something to write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file; give a directory to write the report into")
    _no_file_above(path)
    return path


def check_dir(out_dir: Path, marker: str, inputs: Sequence[Path] = ()) -> Path:
    """A directory output of the kind `marker` names, which replacing would lose nothing else."""
    out_dir = Path(out_dir)
    if out_dir.resolve() == out_dir.resolve().parent or out_dir.name in ("", ".", ".."):
        # a version is written beside its path and renamed onto it: '.', '..' or '/' has no beside
        raise OutputError(f"--out {out_dir}: name a directory to write, not {str(out_dir)!r}")
    if out_dir.is_symlink():
        # Replacing the link's target in place would change what a server watching the link serves
        # before the new version is complete; a new version goes beside it and the link is repointed.
        raise OutputError(
            f"{out_dir} is a symbolic link (to {out_dir.readlink()}): write to a new directory, then "
            "repoint the link (README: hot swap)"
        )
    _not_an_input(out_dir, inputs)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} is a file; give a directory to write")
    if out_dir.is_dir() and not (out_dir / marker).exists() and any(out_dir.iterdir()):
        raise OutputError(
            f"{out_dir} is not empty and holds no {marker}: refusing to replace it; give a new directory"
        )
    _creatable_parent(out_dir)
    return out_dir


class _Run:
    """One replacement of `out_dir`: its staging and moved-aside directories, named after a lock
    file that the run holds (flock) until it has finished. The lock dies with the process, however
    it ends, so a later run that can take it knows that nobody will finish that run's work."""

    def __init__(self, out_dir: Path, token: str | None = None) -> None:
        self.out_dir = out_dir
        self.token = token or secrets.token_hex(8)
        prefix = out_dir.parent / f".{out_dir.name}"
        self.lock = Path(f"{prefix}.run-{self.token}.lock")
        self.staging = Path(f"{prefix}.staging-{self.token}")
        self.aside = Path(f"{prefix}.replaced-{self.token}")
        self._fd: int | None = None

    @classmethod
    def start(cls, out_dir: Path) -> _Run:
        while True:
            run = cls(out_dir)
            try:
                run._fd = os.open(run.lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            fcntl.flock(run._fd, fcntl.LOCK_EX)
            # a plain mkdir: tempfile.mkdtemp's 0700 would become the output's own mode once
            # renamed into place, and a server running as another user could not read the bundle
            run.staging.mkdir()
            return run

    def abandoned(self) -> bool:
        """Takes the lock of a run found on disk if its process is gone; False if it is alive (or
        the lock cannot be told: then it is left alone)."""
        try:
            self._fd = os.open(self.lock, os.O_RDWR)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.finish(unlink=False)
            return False
        return True

    def finish(self, unlink: bool = True) -> None:
        if unlink:
            with contextlib.suppress(OSError):
                self.lock.unlink()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _remove_abandoned(out_dir: Path) -> None:
    """Clears what runs killed beside `out_dir` (SIGKILL, or a SIGTERM with no handler) left: their
    staging directories go, and an old output one was killed while replacing goes back in place
    (the contract: a run that does not finish leaves `out_dir` as it was). Only directories named
    after a run's lock file that nobody holds are touched."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.run-([0-9a-f]{{16}})\.lock")
    with os.scandir(out_dir.parent) as entries:
        tokens = [
            m.group(1)
            for e in entries
            if (m := pattern.fullmatch(e.name)) and e.is_file(follow_symlinks=False)
        ]
    for token in tokens:
        run = _Run(out_dir, token)
        if not run.abandoned():
            continue
        try:
            if run.aside.is_dir() and not run.aside.is_symlink() and not out_dir.exists():
                run.aside.rename(out_dir)
        except OSError:  # left as it is, for a person to look at: nothing of it is removed
            run.finish(unlink=False)
            continue
        for leftover in (run.staging, run.aside):
            if leftover.is_dir() and not leftover.is_symlink():
                _remove_tree(leftover)
        run.finish()


@contextmanager
def replaced_dir(out_dir: Path, marker: str, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yields an empty staging directory; once the body has filled it without an error, it takes
    `out_dir`'s place. An error removes it and leaves `out_dir` as it was."""
    out_dir = check_dir(out_dir, marker, inputs)
    make_parent(out_dir)
    _remove_abandoned(out_dir)
    run = _Run.start(out_dir)
    try:
        try:
            yield run.staging
        except BaseException:
            _remove_tree(run.staging)
            raise
        if out_dir.exists():  # moved aside whole, so that a failure leaves it whole
            # renamed in the same parent: moving a directory to another parent rewrites its "..",
            # which a read-only output refuses to anyone but root
            out_dir.rename(run.aside)
            run.staging.rename(out_dir)
            _remove_tree(run.aside)
        else:
            run.staging.rename(out_dir)
    finally:
        run.finish()


def _remove_tree(path: Path) -> None:
    """Removes a directory this code made or moved aside, read-only directories in it included:
    each is made writable, top down, before its entries go (links are not followed, and nothing
    above `path` is touched); what still cannot be removed is left."""

    def writable(directory: str) -> None:
        with contextlib.suppress(OSError):
            os.chmod(directory, 0o700)

    writable(str(path))
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):
                writable(child)
    shutil.rmtree(path, ignore_errors=True)
