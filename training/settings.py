"""Where the offline pipeline keeps what it can reuse between runs."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cost-aware-router"


class TrainSettings(BaseSettings):
    """Read from ROUTER_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="ROUTER_")

    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Exported embedders and cached embeddings; deleting it only costs time.",
    )
    threads: int = Field(default=0, ge=0, description="Threads for the ONNX Runtime embedder; 0 = all cores.")
