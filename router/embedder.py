"""The one prompt embedder, shared by the trainer and the service (train/serve parity).

An ONNX graph of all-MiniLM-L6-v2 with mean pooling and L2 normalisation inside it, fed by the
model's own WordPiece tokenizer. Both sides tokenize, truncate and batch through this class, so the
features a head was trained on are the features it is served.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from router.runtime import make_session

# all-MiniLM-L6-v2 was trained with 256-token inputs (sentence-transformers' max_seq_length).
DEFAULT_MAX_TOKENS = 256


# What one encoder call costs beyond its tokens, in tokens' worth of compute (ONNX Runtime dispatch,
# thread wake-up; measured on the 2-core CPU as ~6 ms against ~0.14 ms per token). Merging two
# groups pays off only when it saves more than this in calls compared with what it adds in padding.
CALL_OVERHEAD_TOKENS = 48


def plan_batches(sorted_lengths: Sequence[int], max_batch: int) -> list[slice]:
    """Splits prompts sorted by length into batches that minimise padded tokens plus call overhead.

    A batch costs CALL_OVERHEAD_TOKENS + size x its longest prompt; exact dynamic programming over
    contiguous runs (a batch of similar lengths is always contiguous once sorted), O(n x max_batch).
    """
    n = len(sorted_lengths)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = sorted_lengths[end - 1]
        for start in range(max(0, end - max_batch), end):
            cost = best[start] + CALL_OVERHEAD_TOKENS + (end - start) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups = []
    end = n
    while end > 0:
        groups.append(slice(cut[end], end))
        end = cut[end]
    return groups[::-1]


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """Token ids as the encoder sees them, plus the length of the whole (untruncated) prompt."""

    ids: np.ndarray  # int64, [CLS] ... [SEP], at most max_tokens long
    full_tokens: int  # word pieces of the whole prompt, without special tokens


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Embedder:
    """Tokenizes prompts and runs the ONNX encoder on length-bucketed batches."""

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
        self._session = make_session(self.onnx_path, provider=provider, threads=threads)
        self.provider = self._session.get_providers()[0]
        self.dim = int(self._session.get_outputs()[0].shape[-1])
        self.sha256 = hashlib.sha256(
            (file_sha256(self.onnx_path) + file_sha256(self.tokenizer_path) + str(max_tokens)).encode()
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

    def embed_tokenized(self, prompts: Sequence[TokenizedPrompt], batch_size: int = 32) -> np.ndarray:
        """Embeds in batches of similar length: padding to a batch's longest prompt is pure waste."""
        result = np.empty((len(prompts), self.dim), dtype=np.float32)
        if not prompts:
            return result
        order = np.argsort([len(p.ids) for p in prompts], kind="stable")
        for group in plan_batches([len(prompts[i].ids) for i in order], batch_size):
            idx = order[group]
            result[idx] = self._run([prompts[i].ids for i in idx])
        return result

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        return self.embed_tokenized(self.tokenize(texts), batch_size=batch_size)

    def _run(self, ids_list: Sequence[np.ndarray]) -> np.ndarray:
        width = max(len(ids) for ids in ids_list)
        input_ids = np.zeros((len(ids_list), width), dtype=np.int64)
        mask = np.zeros((len(ids_list), width), dtype=np.int64)
        for row, ids in enumerate(ids_list):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        (emb,) = self._session.run(None, {"input_ids": input_ids, "attention_mask": mask})
        return np.asarray(emb, dtype=np.float32)
