"""The one prompt embedder, shared by the trainer and the service (train/serve parity).

An ONNX graph of all-MiniLM-L6-v2 with mean pooling and L2 normalisation inside it, fed by the
model's own WordPiece tokenizer. Both sides tokenize, truncate and encode through this class, so
the features a head was trained on are the features it is served.

Every prompt is encoded on its own: one encoder run per prompt, at its exact length, never padded
and never batched with other prompts. A prompt's embedding is then a function of that prompt
alone, bit for bit, whatever else is in flight. Batching prompts together does not give that: the
int8 encoder quantises its activations with one scale per input tensor, so each prompt's features
depended on its neighbours in the queue (up to 0.03 per coordinate), and even the fp32 graph's
pooling took another summation path for a batch of one than for larger batches.

Several prompts are encoded side by side instead, one single-threaded run per worker thread; a
lone prompt gets every thread. The number of threads inside a run does not change its arithmetic
(tests hold both properties), and on a small CPU prompts side by side beat both threads on one
prompt and padded batches (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from router.core.runtime import make_session

# all-MiniLM-L6-v2 was trained with 256-token inputs (sentence-transformers' max_seq_length).
DEFAULT_MAX_TOKENS = 256
# Part of the embedder's identity (and so of every cache key): bump it whenever the way prompts
# reach the encoder changes, so that no embedding computed the old way is ever reused.
ENCODING = "one prompt per encoder run, unpadded"


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """Token ids as the encoder sees them, plus the length of the whole (untruncated) prompt."""

    ids: np.ndarray  # int64, [CLS] ... [SEP], at most max_tokens long
    full_tokens: int  # word pieces of the whole prompt, without special tokens


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a container's cpuset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Embedder:
    """Tokenizes prompts and encodes each one alone; several at once on `threads` workers."""

    def __init__(
        self,
        onnx_path: Path,
        tokenizer_path: Path,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        provider: str = "auto",
        threads: int = 0,
    ) -> None:
        from tokenizers import Tokenizer

        self.onnx_path = Path(onnx_path)
        self.tokenizer_path = Path(tokenizer_path)
        self.max_tokens = max_tokens
        self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        # Truncation is done by hand (see tokenize) so that the whole prompt's length is known too.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        sep = self._tokenizer.token_to_id("[SEP]")
        if sep is None:
            raise ValueError(f"{self.tokenizer_path}: tokenizer has no [SEP] token")
        self._sep_id = sep
        self.workers = threads or available_cores()
        self._lone = make_session(self.onnx_path, provider=provider, threads=self.workers)
        self._each = self._lone
        self._pool: ThreadPoolExecutor | None = None
        if self.workers > 1:
            # one session, run from several threads at once (ONNX Runtime allows concurrent runs)
            self._each = make_session(self.onnx_path, provider=provider, threads=1)
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="encoder")
        self.provider = self._lone.get_providers()[0]
        self.dim = int(self._lone.get_outputs()[0].shape[-1])
        self.sha256 = hashlib.sha256(
            "".join(
                [file_sha256(self.onnx_path), file_sha256(self.tokenizer_path), str(max_tokens), ENCODING]
            ).encode()
        ).hexdigest()

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedPrompt]:
        out = []
        for enc in self._tokenizer.encode_batch(list(texts), add_special_tokens=True):
            ids = enc.ids
            full = len(ids) - 2
            if len(ids) > self.max_tokens:
                # Same rule as the Hugging Face truncation of a single sequence: keep the head.
                ids = [*ids[: self.max_tokens - 1], self._sep_id]
            out.append(TokenizedPrompt(np.asarray(ids, dtype=np.int64), full))
        return out

    def embed_tokenized(self, prompts: Sequence[TokenizedPrompt]) -> np.ndarray:
        result = np.empty((len(prompts), self.dim), dtype=np.float32)
        if len(prompts) == 1 or self._pool is None:
            for row, prompt in enumerate(prompts):
                result[row] = _encode(self._lone, prompt.ids)
            return result
        # longest first, so that no worker is left with a long prompt at the end
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].ids))
        encoded = self._pool.map(lambda i: _encode(self._each, prompts[i].ids), order)
        for row, vector in zip(order, encoded, strict=True):
            result[row] = vector
        return result

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_tokenized(self.tokenize(texts))


def _encode(session: Any, ids: np.ndarray) -> np.ndarray:
    input_ids = ids[None, :]
    (emb,) = session.run(None, {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)})
    return np.asarray(emb[0], dtype=np.float32)
