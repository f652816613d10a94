"""Running graphs with onnxruntime."""
from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort

# Compute threads of every session that does not ask for a number (0: onnxruntime's default, one per core).
# Parallel workers set 1 so that N workers on N cores do not fight for them (graphcert.distributed).
DEFAULT_THREADS = 0


# Feeds are converted to the input's type (integer inputs, such as the int8 weights of a quantized model, too).
FEED_TYPES = {"tensor(double)": np.float64, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
              "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64,
              "tensor(bool)": np.bool_}


# onnxruntime's graph optimisations are most of making a session for a bound graph (eran's 6x200 sigmoid net's
# CROWN graph, 4,184 nodes: 0.62-0.77 s with them, 0.22-0.26 s without; ACAS Xu's, 1,948 nodes: 0.24 vs 0.07 s)
# and save 13-28 % of each run. Many graphs run once or a few times (root bounds, alpha-CROWN's start, the
# layer-by-layer cut models): a session starts without them and is made again with them once its runs have
# taken REOPTIMISE_AFTER times what making it took (at least REOPTIMISE_MIN_SECONDS), so that the remaking
# (about three times the first making) costs a fraction of the running it speeds up.
REOPTIMISE_AFTER = 10.0
REOPTIMISE_MIN_SECONDS = 0.5


class Session:
    """An onnxruntime session over a ModelProto that takes and returns dicts of numpy arrays.

    `optimise`: onnxruntime's graph optimisations from the start (True), never (False), or once the session
    has been run enough for them to pay (None, `REOPTIMISE_AFTER`)."""

    def __init__(self, proto: onnx.ModelProto, threads: int = 0, log_severity: int = 3,
                 optimise: bool | None = None):
        self.threads, self.log_severity = threads or DEFAULT_THREADS, log_severity
        began = time.perf_counter()
        self.session = self._make(proto.SerializeToString(), optimise is True)
        made = time.perf_counter() - began
        # the graph to make again with optimisations, and after how many seconds of runs
        self._proto = proto if optimise is None else None
        self._remake_after = max(REOPTIMISE_MIN_SECONDS, REOPTIMISE_AFTER * made)
        self._run_seconds = 0.0
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.input_types = {i.name: FEED_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _make(self, serialized: bytes, optimise: bool) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = self.log_severity
        if not optimise:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        feeds = {k: self._fit_rank(k, np.asarray(v, dtype=self.input_types[k])) for k, v in feeds.items()
                 if k in self.input_names}
        names = outputs or self.output_names
        began = time.perf_counter()
        found = self.session.run(names, feeds)
        if self._proto is not None:
            self._run_seconds += time.perf_counter() - began
            if self._run_seconds > self._remake_after:
                self.session, self._proto = self._make(self._proto.SerializeToString(), True), None
        return dict(zip(names, found))

    def _fit_rank(self, name: str, array: np.ndarray) -> np.ndarray:
        """Broadcastable inputs (epsilon) may come with fewer dimensions: pad with leading ones."""
        rank = self.input_ranks[name]
        if array.ndim < rank:
            array = array.reshape((1,) * (rank - array.ndim) + array.shape)
        return array


class LazySession:
    """A bound graph's onnxruntime session (`proto`, `threads`), made on first use: verify's float32 mode may run
    the graph in float64 instead (`in_double`, `graphcert.precision.DoubleSession`), and then never needs the
    float32 one."""
    proto: onnx.ModelProto
    threads: int = 0
    _session = None

    @property
    def session(self):
        if self._session is None:
            self._session = Session(self.proto, threads=self.threads)
        return self._session

    @session.setter
    def session(self, session) -> None:
        self._session = session

    def in_double(self) -> None:
        """Run the graph in float64 from now on (onnxruntime double, outputs rounded outward to float32)."""
        from .precision import DoubleSession
        self.session = DoubleSession(self.proto)
