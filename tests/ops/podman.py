"""Building and running the real serving image with podman, on a machine with no registry access.

What it takes in this sandbox (docs/OPERATIONS.md): a base image made from Debian packages
(mmdebstrap, imported with `podman import`), the runc runtime with cgroupfs and no default ulimits
(a containers.conf of our own, through CONTAINERS_CONF), and the host's CA certificates and pip
configuration mounted read-only into the build, so that pip inside it reaches the same index the
same way the host does. Users building for real keep the Dockerfile's default base image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
IGNOREFILE = REPO / "deploy" / "docker" / "Dockerfile.dockerignore"
BASE_IMAGE = "localhost/router-test-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
CONTAINERS_CONF = """\
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"

[containers]
default_ulimits = []
"""
TOOLS = ("podman", "runc", "mmdebstrap")


def _pip_paths() -> list[Path]:
    """The host pip's configuration files and every local path they point at (certificates,
    find-links, file:// indexes, constraints), as `pip config debug` / `list` report them."""
    pip = [sys.executable, "-m", "pip", "config"]
    debug = subprocess.run([*pip, "debug"], capture_output=True, text=True, check=True).stdout
    listed = subprocess.run([*pip, "list"], capture_output=True, text=True, check=True).stdout
    paths = [Path(p) for p in re.findall(r"^\s+(/\S+), exists: True$", debug, flags=re.MULTILINE)]
    for value in re.findall(r"='([^']*)'", listed):
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if path.is_absolute() and path.exists():
                # a local simple index links its files relative to the directory above it
                paths.append(path.parent if path.name == "simple" else path)
    return paths


@dataclass
class Podman:
    conf: Path

    @property
    def env(self) -> dict[str, str]:
        return os.environ | {"CONTAINERS_CONF": str(self.conf)}

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:3])} ... failed:\n{result.stderr[-4000:]}")
        return result

    @classmethod
    def start(cls, workdir: Path) -> Podman:
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(
                f"{', '.join(missing)} not installed: `make container-tools` installs the Debian packages"
            )
        conf = workdir / "containers.conf"
        conf.write_text(CONTAINERS_CONF, encoding="utf-8")
        podman = cls(conf)
        podman.ensure_base(workdir)
        return podman

    def ensure_base(self, workdir: Path) -> None:
        if self("image", "exists", BASE_IMAGE, check=False).returncode == 0:
            return
        tarball = workdir / "base.tar"
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(tarball)],
            check=True,
            capture_output=True,
            timeout=900,
        )
        self("import", str(tarball), BASE_IMAGE)
        tarball.unlink()

    def build(self, tag: str, *args: str, context: Path = REPO, dockerfile: Path = DOCKERFILE) -> None:
        mounts = [f"-v={p}:{p}:ro" for p in dict.fromkeys([Path("/etc/ssl/certs"), *_pip_paths()])]
        self(
            "build",
            "--network=host",
            *mounts,
            f"--ignorefile={IGNOREFILE}",
            f"--build-arg=PYTHON_IMAGE={BASE_IMAGE}",
            "-f",
            str(dockerfile),
            "-t",
            tag,
            *args,
            str(context),
            timeout=1200,
        )

    def inspect(self, image: str) -> dict[str, Any]:
        (info,) = json.loads(self("image", "inspect", image).stdout)
        return dict(info)
