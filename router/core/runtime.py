"""ONNX Runtime sessions: which execution provider, how many threads, which optimisations.

The CUDA provider is used when the GPU runtime (the `gpu` extra) is installed and a device is
present; otherwise the CPU one. The choice is made once, when a session is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # neither extra installed
        raise RuntimeError(
            "ONNX Runtime is not installed: install the package with the `cpu` extra "
            "(onnxruntime) or the `gpu` extra (onnxruntime-gpu)"
        ) from exc
    return onnxruntime


def choose_provider(requested: str = "auto") -> str:
    """`auto` means CUDA when this ONNX Runtime build offers it, else CPU."""
    available = _ort().get_available_providers()
    if requested == "auto":
        return CUDA if CUDA in available else CPU
    wanted = {"cuda": CUDA, "cpu": CPU}.get(requested.lower(), requested)
    if wanted not in available:
        raise ValueError(f"execution provider {requested!r} is not available here (have: {available})")
    return wanted


def make_session(source: Path | bytes, *, provider: str = "auto", threads: int = 0) -> Any:
    """An inference session with full graph optimisation; threads=0 lets ONNX Runtime decide.

    `source` is an ONNX file, or a serialised graph (the trainer runs its heads before writing them)."""
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle ONNX Runtime workers spin by default; on a small, shared CPU box that steals the cores
    # the gRPC event loop needs between batches (Route throughput under load was measurably lower
    # with spinning on; docs/BENCHMARKS.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chosen = choose_provider(provider)
    providers = [chosen] if chosen == CPU else [chosen, CPU]
    name = source.name if isinstance(source, Path) else "graph"
    model = source if isinstance(source, bytes) else str(source)
    try:
        return ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise ValueError(f"{name}: not a loadable ONNX model ({exc})") from exc
