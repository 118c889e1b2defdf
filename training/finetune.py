"""Fine-tunes the top of the MiniLM encoder on the routing labels (the `quality` profile).

A frozen 384-d sentence embedding carries little of what decides which model answers a prompt
well; teaching the encoder's top layers the routing labels does. To make that affordable on a
CPU, the lower layers stay frozen: their token states are computed once, and only the top layers
and a multi-output head (warm-started on the frozen embedding) are trained, with masked binary
cross-entropy over all models at once. The result is a whole encoder again, saved in Hugging Face
format, which `embedder_export` turns into the bundle's ONNX embedder, so the service embeds with
exactly the fine-tuned weights.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from router.embedder import TokenizedPrompt
from training.mlp_heads import MlpParams, fit_quality_mlp

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclass(frozen=True)
class FinetuneParams:
    frozen_layers: int = 4  # of MiniLM's 6; the layers above them are trained
    epochs: int = 4
    lr_encoder: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    head: MlpParams = field(default_factory=lambda: MlpParams(hidden=256, dropout=0.4, epochs=10, seeds=(0,)))
    seed: int = 0


def device() -> str:
    """The GPU when one is present (CUDA build of torch), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _additive_mask(mask: Any) -> Any:
    """BERT's eager attention adds this to the scores: 0 for tokens, a large negative for padding."""
    return (1.0 - mask[:, None, None, :]) * -1e4


class _Top:
    """The trainable top of the encoder plus pooling and normalisation (as the ONNX export does)."""

    def __init__(self, layers: Sequence[Any]) -> None:
        import torch

        self.layers = torch.nn.ModuleList(layers)

    def embed(self, hidden: Any, mask: Any) -> Any:
        import torch

        additive = _additive_mask(mask)
        for layer in self.layers:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        pooled = (hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def _batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar length (padding is wasted compute)."""
    rows = rng.permutation(len(lengths))
    out: list[np.ndarray] = []
    window = batch_size * 50
    for start in range(0, len(rows), window):
        chunk = rows[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def _pad(states: Sequence[np.ndarray], rows: np.ndarray, dev: str) -> tuple[Any, Any]:
    import torch

    width = max(len(states[r]) for r in rows)
    hidden = np.zeros((len(rows), width, states[rows[0]].shape[1]), dtype=np.float32)
    mask = np.zeros((len(rows), width), dtype=np.float32)
    for i, r in enumerate(rows):
        hidden[i, : len(states[r])] = states[r]
        mask[i, : len(states[r])] = 1.0
    return torch.from_numpy(hidden).to(dev), torch.from_numpy(mask).to(dev)


def lower_states(
    model: Any, tokens: Sequence[TokenizedPrompt], frozen_layers: int, dev: str
) -> list[np.ndarray]:
    """Token states after the frozen layers, per prompt (float16, unpadded), computed once."""
    import torch

    lower = copy.deepcopy(model)
    lower.encoder.layer = lower.encoder.layer[:frozen_layers]
    lower.to(dev).eval()
    out: list[np.ndarray] = [np.empty(0)] * len(tokens)
    order = np.argsort([len(t.ids) for t in tokens], kind="stable")
    with torch.no_grad():
        for start in range(0, len(order), 64):
            rows = order[start : start + 64]
            width = max(len(tokens[r].ids) for r in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for i, r in enumerate(rows):
                ids[i, : len(tokens[r].ids)] = tokens[r].ids
                mask[i, : len(tokens[r].ids)] = 1
            hidden = lower(
                input_ids=torch.from_numpy(ids).to(dev), attention_mask=torch.from_numpy(mask).to(dev)
            ).last_hidden_state
            for i, r in enumerate(rows):
                out[r] = hidden[i, : len(tokens[r].ids)].float().cpu().numpy().astype(np.float16)
    return out


def finetune(
    base_dir: Path,
    tokens: Sequence[TokenizedPrompt],
    score: np.ndarray,
    frozen_embeddings: np.ndarray,
    params: FinetuneParams,
    out_dir: Path,
) -> Path:
    """Trains the top layers on (tokens, scores); writes the whole fine-tuned encoder to out_dir."""
    import torch
    from transformers import AutoModel

    dev = device()
    torch.manual_seed(params.seed)
    started = time.perf_counter()
    head = fit_quality_mlp(frozen_embeddings, score, params.head, params.seed).to(dev)
    base = AutoModel.from_pretrained(str(base_dir), attn_implementation="eager")
    base.eval()
    states = lower_states(base, tokens, params.frozen_layers, dev)
    log.info(
        "fine-tune: lower-layer states of %d prompts in %.0f s", len(tokens), time.perf_counter() - started
    )
    top = _Top([copy.deepcopy(layer) for layer in base.encoder.layer[params.frozen_layers :]])
    top.layers.to(dev)
    observed = ~np.isnan(score)
    targets = torch.tensor(np.where(observed, score, 0.0), dtype=torch.float32, device=dev)
    weights = torch.tensor(observed, dtype=torch.float32, device=dev)
    optimiser = torch.optim.AdamW(
        [
            {"params": top.layers.parameters(), "lr": params.lr_encoder},
            {"params": head.parameters(), "lr": params.lr_head},
        ],
        weight_decay=params.weight_decay,
    )
    lengths = np.array([len(s) for s in states])
    rng = np.random.default_rng(params.seed)
    steps = params.epochs * ((len(states) + params.batch_size - 1) // params.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=[params.lr_encoder, params.lr_head], total_steps=steps, pct_start=0.1
    )
    for epoch in range(params.epochs):
        top.layers.train()
        head.train()
        total, count = 0.0, 0
        for rows in _batches(lengths, params.batch_size, rng):
            hidden, mask = _pad(states, rows, dev)
            logits = head(top.embed(hidden, mask))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, targets[rows], reduction="none"
            )
            loss = (loss * weights[rows]).sum() / weights[rows].sum().clamp(min=1)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
            count += len(rows)
        log.info(
            "fine-tune: epoch %d/%d, loss %.4f, %.0f s",
            epoch + 1,
            params.epochs,
            total / count,
            time.perf_counter() - started,
        )
    tuned = copy.deepcopy(base)
    for i, layer in enumerate(top.layers):
        tuned.encoder.layer[params.frozen_layers + i] = layer.cpu().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    tuned.save_pretrained(str(out_dir))
    for name in TOKENIZER_FILES:
        if (base_dir / name).exists():
            shutil.copyfile(base_dir / name, out_dir / name)
    return out_dir
