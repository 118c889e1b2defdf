"""Where the training commands write, checked before any work is done.

A directory output (a bundle, a routing table) is assembled beside its target and renamed into
place only once complete, so that a watcher never sees half of one. Replacing an existing output
is how a bundle is retrained in place, but only an output of the same kind is ever replaced: a
directory that is neither empty nor holds the kind's marker file, or one that holds a command's
own input, is refused rather than deleted. The staging directory and the place the old output is
moved aside to get names of their own (hidden, unique), so nothing the command did not make is
ever removed. Those names carry the host and process that made them, so that the next run beside
the same output removes what a killed run (SIGKILL) left behind, and nothing a live process or
another host is still writing. Checks create nothing: missing parent directories are made when the
output is written.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
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


def _owner_tag() -> str:
    """Who makes a staging directory: this host and process, so that a later run can tell one
    left by a killed run from one still being written (on this host; others' are left alone)."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_abandoned(out_dir: Path) -> None:
    """Removes the staging and moved-aside directories that runs killed on this host (SIGKILL, or a
    SIGTERM with no handler) left beside `out_dir`; a live process's, or another host's, stay."""
    host = _owner_tag().rsplit("-", 1)[0]
    for role in ("staging", "replaced"):
        for path in out_dir.parent.glob(f".{out_dir.name}.{role}-{host}-*-*"):
            pid = path.name.rsplit("-", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)) and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)


def _unique_dir(out_dir: Path, role: str) -> Path:
    """A new hidden directory beside `out_dir`, with the mode a plain mkdir gives it.

    Not tempfile.mkdtemp: its 0700 would become the output's own mode once renamed into place,
    and a server running as another user (the container's) could no longer read the bundle."""
    while True:
        path = out_dir.parent / f".{out_dir.name}.{role}-{_owner_tag()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


@contextmanager
def replaced_dir(out_dir: Path, marker: str, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yields an empty staging directory; once the body has filled it without an error, it takes
    `out_dir`'s place. An error removes it and leaves `out_dir` as it was."""
    out_dir = check_dir(out_dir, marker, inputs)
    make_parent(out_dir)
    _remove_abandoned(out_dir)
    staging = _unique_dir(out_dir, "staging")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():  # moved aside whole, so that a failure leaves it whole
        aside = _unique_dir(out_dir, "replaced")
        # onto the empty directory that reserved the name, in the same parent: moving a directory
        # to another parent rewrites its "..", which a read-only output refuses to anyone but root
        out_dir.rename(aside)
        staging.rename(out_dir)
        _remove_tree(aside)
    else:
        staging.rename(out_dir)


def _remove_tree(path: Path) -> None:
    """Removes what a replaced output left, read-only directories included (its owner may make
    them writable; what cannot be removed is left, for the new output is in place already)."""

    def writable_then_retry(function: Callable[..., object], name: str, _: object) -> None:
        try:
            os.chmod(os.path.dirname(name), 0o700)
            function(name)
        except OSError:
            pass

    shutil.rmtree(path, onerror=writable_then_retry)
