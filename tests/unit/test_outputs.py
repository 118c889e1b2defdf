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
