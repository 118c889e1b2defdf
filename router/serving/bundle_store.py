"""The active bundle: loading, verification, warm-up, hot swap and readiness.

The store holds one `Active` bundle at a time and swaps it atomically when the watched path points
at a new one: a call captures the bundle it was admitted under and finishes on it. A bundle that
fails any check is refused, logged and counted, and remembered so that it is not retried until the
path, the manifest or a file it lists changes; the old bundle keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from router.core.bundle import Bundle
from router.core.engine import Engine, open_engine
from router.core.errors import NotReady
from router.core.online import OnlineMemory
from router.serving.metrics import Metrics

log = logging.getLogger(__name__)

# all-MiniLM-L6-v2's: what the online memory stores (a bundle with another embedder does not use it)
DEFAULT_EMBEDDING_DIM = 384
# First runs allocate ONNX Runtime buffers: paid before taking traffic, not by a caller.
WARMUP_PROMPTS = (
    "Hi",
    "Summarise the main causes of the French Revolution in three sentences.",
    "Solve for x: 3x + 7 = 22. Show your work step by step, then state the answer. " * 12,
)


@dataclass(frozen=True)
class Active:
    bundle: Bundle
    engine: Engine
    loaded_at: float
    key: str


def manifest_key(path: Path) -> str:
    """Identifies what a bundle path currently points at: a symlink swap, a rewrite of the manifest
    or of any file it lists changes it, so a bundle refused while its copy was still arriving is
    looked at again once the copy is complete."""
    manifest = Path(path) / "manifest.json"
    stat = manifest.stat()
    key = [f"{manifest.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"]
    try:
        listed = json.loads(manifest.read_bytes()).get("files", {})
    except (ValueError, AttributeError):
        listed = {}  # a manifest that does not parse: the load refuses it, its stat is the key
    for name in sorted(listed) if isinstance(listed, dict) else ():
        try:
            file = (manifest.parent / str(name)).stat()
            key.append(f"{name}:{file.st_mtime_ns}:{file.st_size}")
        except (OSError, ValueError):
            key.append(f"{name}:missing")
    return "|".join(key)


def warm_up(engine: Engine) -> None:
    for size in (1, len(WARMUP_PROMPTS)):
        engine.estimate(list(WARMUP_PROMPTS[:size]))


class BundleStore:
    def __init__(self, path: Path, metrics: Metrics, *, provider: str, threads: int) -> None:
        self.path = Path(path)
        self._metrics = metrics
        self._provider = provider
        self._threads = threads
        self._active: Active | None = None
        self._rejected: set[str] = set()
        # What feedback taught (router/core/online.py), given to every bundle this store loads
        # that embeds as the first one did: another encoder's embeddings, even of the same size,
        # are not comparable with those the memory holds.
        self.online = OnlineMemory(DEFAULT_EMBEDDING_DIM)
        self._online_embedder: str | None = None  # the base model the memory's embeddings come from

    @property
    def ready(self) -> bool:
        return self._active is not None

    @property
    def active(self) -> Active:
        if self._active is None:
            raise NotReady("no bundle loaded")
        return self._active

    def load_initial(self) -> None:
        """Loads the configured bundle (blocking); raises BundleError if it is unusable."""
        self._active = self._load()

    async def reload_if_changed(self) -> bool:
        """Loads and swaps in the bundle at the watched path if it changed; a bad one is refused."""
        try:
            key = manifest_key(self.path)
        except OSError:
            return False  # mid-swap or missing: keep serving, look again later
        if (self._active is not None and key == self._active.key) or key in self._rejected:
            return False
        try:
            fresh = await asyncio.get_running_loop().run_in_executor(None, self._load)
        except Exception as exc:
            self._rejected.add(key)
            log.error("new bundle at %s refused, still serving the old one: %s", self.path, exc)
            return False
        old = self._active
        self._active = fresh  # atomic: calls admitted from now on use the new bundle
        log.info("swapped bundle %s -> %s", old.bundle.version if old else None, fresh.bundle.version)
        return True

    def _load(self) -> Active:
        key = manifest_key(self.path)
        try:
            bundle, engine = open_engine(self.path, provider=self._provider, threads=self._threads)
            base_model = bundle.manifest.embedder.base_model
            if bundle.embedder.dim != self.online.dim:
                log.warning(
                    "bundle embeds in %d dimensions: the online memory is not used", bundle.embedder.dim
                )
            elif self._online_embedder not in (None, base_model):
                log.warning(
                    "bundle embeds with %s, the online memory holds %s's embeddings: it is not used "
                    "(restart to learn with the new encoder)",
                    base_model,
                    self._online_embedder,
                )
            else:
                engine.online = self.online
            warm_up(engine)
        except Exception:
            self._metrics.bundle_loads.labels(result="failure").inc()
            raise
        self._metrics.bundle_loads.labels(result="success").inc()
        if engine.online is not None:
            self._online_embedder = base_model
        active = Active(bundle, engine, time.time(), key)
        m = bundle.manifest
        self._metrics.set_bundle(m.bundle_version, m.embedder.precision, engine.models, active.loaded_at)
        self._metrics.set_provider(bundle.embedder.provider)
        log.info(
            "bundle %s loaded (%d models, embedder %s on %s)",
            m.bundle_version,
            len(engine.models),
            m.embedder.precision,
            bundle.embedder.provider,
        )
        return active
