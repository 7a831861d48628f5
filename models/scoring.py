"""Scoring with ONNX Runtime: one session per process, one thread, sequential, warmed at construction.

One intra-op thread because the request path scores one small matrix (K rows) at a time:
thread hand-offs would cost more than the work, and several uvicorn workers already use
the cores. The session is warmed with a dummy batch so that the first real request does
not pay for lazy initialisation.
"""

from __future__ import annotations

import numpy as np

from models.registry import LoadedModel, ModelLoadError


class Scorer:
    """P(stay) for feature rows, from a verified model version (see :class:`models.registry.Registry`)."""

    def __init__(self, model: LoadedModel, *, intra_op_threads: int = 1) -> None:
        import onnxruntime as ort  # imported here so that importing models/ stays light

        self.model = model
        self.version = model.version
        self.n_features = model.schema.n_features
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model.onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"model {model.version}: ONNX Runtime cannot load {model.onnx_path.name}: {exc}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"model {model.version}: expected one input, the ONNX graph has {len(inputs)}")
        self.input_name = inputs[0].name
        width = inputs[0].shape[-1] if inputs[0].shape else None
        if isinstance(width, int) and width != self.n_features:
            raise ModelLoadError(
                f"model {model.version}: the ONNX graph takes {width} features, its schema has {self.n_features}"
            )
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "probabilities" if "probabilities" in outputs else outputs[-1]
        self._outputs = [self.output_name]
        # The C++ session's run skips ~12 us of Python-side validation per call (measured, onnxruntime
        # 1.31, pinned); the public run is the fallback if a future version moves the attribute.
        raw = getattr(self.session, "_sess", None)
        self._run = raw.run if raw is not None and hasattr(raw, "run") else None
        warm = self.p_stay(np.zeros((8, self.n_features), dtype=np.float32))
        if warm.shape != (8,):
            raise ModelLoadError(f"model {model.version}: scoring 8 rows returned shape {warm.shape}")

    def p_stay(self, X: np.ndarray) -> np.ndarray:
        """Return the float64 P(stay) of each row of the float32 (K, n_features) matrix `X`."""
        if X.dtype != np.float32:
            X = X.astype(np.float32)
        if self._run is not None:
            probs = self._run(self._outputs, {self.input_name: X}, None)[0]
        else:
            probs = self.session.run(self._outputs, {self.input_name: X})[0]
        return np.asarray(probs[:, 1], dtype=np.float64)
