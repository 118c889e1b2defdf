"""Directory outputs: renamed into place whole, readable as a plain mkdir would leave them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from training.outputs import BUNDLE_MARKER, replaced_dir


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_a_written_output_has_the_mode_mkdir_gives_so_other_users_can_read_it(
    tmp_path: Path, umask_022: None
) -> None:
    # A server in a container runs as another user than the trainer; a 0700 bundle is unreadable.
    out = tmp_path / "bundle"
    with replaced_dir(out, BUNDLE_MARKER) as staging:
        (staging / BUNDLE_MARKER).write_text("{}")
    assert out.stat().st_mode & 0o777 == 0o755
    with replaced_dir(out, BUNDLE_MARKER) as staging:
        (staging / BUNDLE_MARKER).write_text('{"v": 2}')
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / BUNDLE_MARKER).read_text() == '{"v": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_failed_write_leaves_the_old_output_and_no_staging_behind(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / BUNDLE_MARKER).write_text("old")
    with pytest.raises(RuntimeError), replaced_dir(out, BUNDLE_MARKER) as staging:
        (staging / BUNDLE_MARKER).write_text("new")
        raise RuntimeError("training failed")
    assert (out / BUNDLE_MARKER).read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_an_output_with_no_name_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out .` from an empty directory passed the checks, and the rename onto '.' failed with
    a raw OSError once the work was done, leaving its staging directory behind."""
    from training.errors import OutputError
    from training.outputs import check_dir

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    for name in (".", "..", str(empty / ".."), "/"):
        with pytest.raises(OutputError, match="name a directory"):
            check_dir(Path(name), BUNDLE_MARKER)
    assert check_dir(Path("v2"), BUNDLE_MARKER) == Path("v2")
    assert not list(tmp_path.rglob("*staging*"))


_WRITER = """
import sys, time
from pathlib import Path
from training.outputs import BUNDLE_MARKER, replaced_dir
with replaced_dir(Path(sys.argv[1]), BUNDLE_MARKER) as staging:
    (staging / "half-written").write_text("x")
    print(staging, flush=True)
    time.sleep(60)
"""


def _writer(out: Path) -> tuple[subprocess.Popen[str], Path]:
    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_a_killed_runs_staging_is_removed_by_the_next_run_and_a_live_ones_is_not(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    killed, abandoned = _writer(out)
    live, in_progress = _writer(out)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert abandoned.is_dir() and in_progress.is_dir()
        with replaced_dir(out, BUNDLE_MARKER) as staging:
            (staging / BUNDLE_MARKER).write_text("{}")
        assert not abandoned.exists()  # its process is gone: nobody will finish it
        assert in_progress.is_dir()  # its process may still rename it into place
        assert (out / BUNDLE_MARKER).read_text() == "{}"
    finally:
        live.kill()
        live.wait(timeout=30)


_REPLACER = """
import os, sys
from pathlib import Path
from training.outputs import BUNDLE_MARKER, replaced_dir
out = Path(sys.argv[1])
for version in ("1", "2"):
    with replaced_dir(out, BUNDLE_MARKER) as staging:
        (staging / BUNDLE_MARKER).write_text(version)
    os.chmod(out / BUNDLE_MARKER, 0o444)
    os.chmod(out, 0o555)  # a published bundle its owner made read-only
print((out / BUNDLE_MARKER).read_text())
"""


def test_a_read_only_output_is_replaced_by_its_owner_without_root_powers(tmp_path: Path) -> None:
    # Root passes every permission check; where the tests run as root, the writer runs without the
    # capabilities that bypass them (setpriv, util-linux), as a plain user owning the output would.
    command = [sys.executable, "-c", _REPLACER, str(tmp_path / "bundle")]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "2"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # nothing left aside
    finally:
        (tmp_path / "bundle").chmod(0o755)  # so that pytest can clean up as any user


def test_only_what_a_dead_runs_lock_names_is_cleared_and_lookalikes_stay(tmp_path: Path) -> None:
    out = tmp_path / "v[12]"  # a name that is also a glob pattern
    lookalikes = [
        tmp_path / ".v1.staging-0123456789abcdef",
        tmp_path / ".v[12].staging-vm-20250101-backup",
        tmp_path / ".v[12].staging-0123456789abcdef",  # no lock file names it: not a run's
    ]
    for path in lookalikes:
        (path / "keep").mkdir(parents=True)
    with replaced_dir(out, BUNDLE_MARKER) as staging:
        (staging / BUNDLE_MARKER).write_text("{}")
    assert all((path / "keep").is_dir() for path in lookalikes)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["v[12]", *(p.name for p in lookalikes)])


def test_a_run_killed_between_its_two_renames_leaves_the_old_output_in_place(tmp_path: Path) -> None:
    """What a run killed after moving the old output aside, before renaming its staging into place,
    leaves: its lock file (no longer held), the old output aside, the new one staged."""
    out = tmp_path / "bundle"
    token = "00112233445566ff"
    (tmp_path / f".bundle.run-{token}.lock").write_text("")
    (tmp_path / f".bundle.replaced-{token}").mkdir()
    (tmp_path / f".bundle.replaced-{token}" / BUNDLE_MARKER).write_text("old")
    (tmp_path / f".bundle.staging-{token}").mkdir()
    (tmp_path / f".bundle.staging-{token}" / BUNDLE_MARKER).write_text("new")
    with pytest.raises(RuntimeError), replaced_dir(out, BUNDLE_MARKER) as staging:
        (staging / BUNDLE_MARKER).write_text("newer")
        raise RuntimeError("this run fails too")
    assert (out / BUNDLE_MARKER).read_text() == "old"  # back in place, not deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_replacing_touches_nothing_above_the_output_and_survives_what_it_cannot_remove(
    tmp_path: Path,
) -> None:
    """An old output holding a directory of another user (a cache a server wrote) and one with no
    permissions at all: the new output takes its place, the parent keeps its mode."""
    out = tmp_path / "bundle"
    with replaced_dir(out, BUNDLE_MARKER) as staging:
        (staging / BUNDLE_MARKER).write_text("1")
        (staging / "cache" / "entry").mkdir(parents=True)
        (staging / "sealed").mkdir()
    if os.geteuid() == 0:
        os.chown(out / "cache", 65534, 65534)
        os.chown(out / "cache" / "entry", 65534, 65534)
    (out / "sealed").chmod(0o000)
    tmp_path.chmod(0o755)
    command = [sys.executable, "-c", _REPLACE_ONCE, str(out)]
    if os.geteuid() == 0:
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner,-chown", "--", *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert (out / BUNDLE_MARKER).read_text() == "2"
        assert tmp_path.stat().st_mode & 0o777 == 0o755
    finally:
        for path in tmp_path.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)


_REPLACE_ONCE = """
import sys
from pathlib import Path
from training.outputs import BUNDLE_MARKER, replaced_dir
with replaced_dir(Path(sys.argv[1]), BUNDLE_MARKER) as staging:
    (staging / BUNDLE_MARKER).write_text("2")
"""
