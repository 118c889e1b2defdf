"""All of the service's configuration, in one typed class.

Every field can be set by environment variable (ROUTER_<FIELD>, e.g. ROUTER_PORT=50051) or by the
matching `router serve` flag. Read once in the entry point, never at import time.
"""

from __future__ import annotations

from pathlib import Path, PurePath

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROUTER_", extra="ignore")

    bundle: Path = Field(
        default=Path("bundles/default"),
        description="Bundle directory (or a symlink to one). Watched: point it at a new bundle "
        "to roll forward.",
    )
    host: str = Field(default="0.0.0.0", description="Address the gRPC server binds.")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0 = pick a free one).")
    metrics_port: int = Field(
        default=9090, ge=0, le=65535, description="Prometheus /metrics port (0 = pick a free one)."
    )
    metrics_host: str = Field(default="0.0.0.0", description="Address the metrics endpoint binds.")
    provider: str = Field(
        default="auto", description="ONNX Runtime execution provider: auto (CUDA if present), cuda or cpu."
    )
    threads: int = Field(default=0, ge=0, description="ONNX Runtime intra-op threads; 0 = one per core.")

    max_batch_size: int = Field(
        default=32, ge=1, le=1024, description="Most prompts gathered into one embedder and heads run."
    )
    max_batch_wait_ms: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        description="How long a batch may wait for more prompts once the engine is free; 0 = never wait, "
        "so a lone request pays nothing (batches still form while the engine is busy).",
    )
    max_in_flight: int = Field(
        default=256, ge=1, description="Route calls admitted at once; beyond it: RESOURCE_EXHAUSTED at once."
    )
    max_prompt_chars: int = Field(
        default=100_000,
        ge=1,
        description="Longer prompts are refused (INVALID_ARGUMENT). The embedder reads only the first "
        "256 word pieces; the cost estimate counts the whole prompt.",
    )
    max_allowed_models: int = Field(default=256, ge=1, description="Most entries in allowed_models.")
    max_message_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest gRPC message accepted or sent, bytes."
    )
    grace_period_s: float = Field(
        default=20.0, ge=0.0, description="On SIGTERM, how long in-flight calls get to finish."
    )
    bundle_poll_s: float = Field(
        default=5.0,
        ge=0.0,
        description="How often the bundle path (and the budgets file) are checked for changes; 0 = never.",
    )
    budgets: Path | None = Field(
        default=None,
        description="YAML file of per-tenant spend targets, caps and allow-lists (README); reloaded "
        "when it changes. Unset: no budgets.",
    )
    spend_store: str = Field(
        default="router-spend.sqlite",
        description="Where per-tenant spend and spend-target state outlive the process (used with "
        "budgets): an SQLite file (PATH or sqlite:///PATH; per replica, on a persistent volume) or "
        "postgresql://... (replicas sharing their tenants' caps).",
    )

    tls_cert: Path | None = Field(default=None, description="PEM server certificate chain: enables TLS.")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        default=None, description="PEM CA bundle: clients must present a certificate it signed (mutual TLS)."
    )
    auth_token: SecretStr | None = Field(
        default=None, description="Bearer token callers must send (authorization: Bearer <token>)."
    )
    auth_token_file: Path | None = Field(default=None, description="File holding the bearer token.")
    auth_exempt_health: bool = Field(
        default=True, description="Let health checks through without the token (for probes)."
    )
    auth_exempt_reflection: bool = Field(
        default=False, description="Let reflection through without the token."
    )
    feedback_store: str | None = Field(
        default=None,
        description="Where decisions and outcome feedback are kept: sqlite:///PATH (one server) or "
        "postgresql://... (replicas sharing one store). Unset: no Feedback, nothing recorded.",
    )
    store_prompts: bool = Field(
        default=False, description="Keep prompt text in the feedback store (off: features only)."
    )
    explore: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Probability of drawing a decision uniformly from the eligible models (logged "
        "with its propensity); 0 = always the best-scoring model.",
    )
    feedback_retention_s: float = Field(
        default=7 * 86400.0, gt=0, description="How long decisions (and their outcomes) are kept."
    )
    log_prompts: bool = Field(default=False, description="Log prompt text (debugging only; off by default).")
    log_level: str = Field(default="INFO", description="Python logging level.")

    @field_validator("spend_store", mode="before")
    @classmethod
    def _spend_store_text(cls, value: object) -> object:
        return str(value) if isinstance(value, PurePath) else value

    @model_validator(mode="after")
    def _check_tls(self) -> ServeSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError("give auth_token or auth_token_file, not both")
        return self

    def token(self) -> bytes | None:
        """The bearer token, from the environment or its file; never logged."""
        if self.auth_token is not None:
            value = self.auth_token.get_secret_value()
        elif self.auth_token_file is not None:
            value = self.auth_token_file.read_text(encoding="utf-8").strip()
        else:
            return None
        if not value:
            raise ValueError("the auth token is empty")
        return value.encode("utf-8")
