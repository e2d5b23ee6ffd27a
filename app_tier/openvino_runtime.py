"""ResNet-50 served by OpenVINO from an IR converted once from the Keras network.

Why: a worker's start-up is part of every scale-out. Measured on a 2-core AVX2
machine, an OpenVINO worker answers its first image about 1 s after start and
holds ~400 MB, where the TensorFlow one takes 5-8 s and ~900 MB; per-thread
throughput is also higher (about 10 against 6.5 images/s). On a 2-core AVX-512
machine: start-up 0.5 s against 4.2 s, 61 against 45 images/s on all cores
(`make bench`). The conversion
itself needs TensorFlow and takes ~5 s; it is done once per weights and
cached (on a real instance, at AMI bake time: see ami/provision.sh).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from app_tier.model import RANDOM_WEIGHTS_SEED, Classifier, build_network
from app_tier.weights import weights_file
from common.config import RANDOM_WEIGHTS

if TYPE_CHECKING:
    from openvino import InferRequest

log = logging.getLogger(__name__)


def import_openvino() -> ModuleType:
    """OpenVINO, without its usage telemetry.

    Its converter, imported with it, sends usage events to Google Analytics
    unless the user has opted out (a consent file under ~/intel; none counts as
    consent). A worker talks to nobody but its own AWS: the telemetry module is
    made unimportable, and OpenVINO falls back to its own no-op stub.
    """
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[assignment]
    import openvino

    return openvino

# Settings for every compilation. fp32 stated, not left to the default: on CPUs
# with bf16 (AVX512_BF16, AMX) OpenVINO would otherwise run in bf16, measured
# 3e-3 off TensorFlow's scores. No CPU pinning: each process pins its threads
# from the first core up without knowing of the others, so two one-thread
# workers on one machine both ran on core 0 (measured on a 2-core machine:
# 15.8 images/s each pinned, 32.3 each unpinned). A real instance runs one
# worker, which pinning would not speed up measurably.
COMPILE_DEFAULTS = {"INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}


def cache_dir() -> Path:
    return Path(os.environ.get("IMGCLASS_CACHE", Path.home() / ".cache" / "imgclass"))


def ir_path(weights: str) -> Path:
    """Where the IR for these weights lives; a changed weights file gets a new name."""
    if weights == RANDOM_WEIGHTS:
        tag = f"random-{RANDOM_WEIGHTS_SEED}"
    elif not Path(weights).is_file():
        # imagenet, or a missing file (whose conversion will say so). ensure_ir names
        # s3:// weights by their local copy, which a new upload replaces.
        tag = hashlib.sha256(weights.encode()).hexdigest()[:16]
    else:
        stat = Path(weights).stat()
        identity = f"{Path(weights).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        tag = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir() / f"resnet50-{tag}.xml"


def ensure_ir(weights: str) -> Path:
    """Convert the Keras network to OpenVINO IR unless it is cached already.

    A file lock makes concurrent workers wait for one conversion instead of
    each doing their own; the IR is written to a temporary folder and moved
    into place, so a reader never sees half a file.
    """
    # For s3:// weights, the copy is brought up to date first, and the IR named after
    # it: named after the URI, it would outlive the upload it was converted from.
    source = weights_file(weights)
    target = ir_path(str(source) if source else weights)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        ov = import_openvino()

        started = time.perf_counter()
        network = build_network(weights, source)
        with warnings.catch_warnings():
            # Keras notes that the converter passes the input as a tuple; harmless here.
            warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
            model = ov.convert_model(network, input=[(-1, 224, 224, 3)])
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        try:
            ov.save_model(model, staging / target.name, compress_to_fp16=False)
            os.replace(staging / target.with_suffix(".bin").name, target.with_suffix(".bin"))
            os.replace(staging / target.name, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("converted ResNet-50 (%s) to OpenVINO IR in %.1f s: %s",
                 weights, time.perf_counter() - started, target)
    return target


class OpenVinoResNet50(Classifier):
    """ResNet-50 compiled from one IR for one image, and again for batches.

    One image runs fastest on one stream using every core (LATENCY hint).
    A batch runs faster as one image per stream, one core per stream
    (THROUGHPUT hint): the streams never wait for each other, so a thread
    preempted by the web tier or the embedded AWS delays one image instead
    of stalling every core at each layer. Measured on a 2-core AVX2 machine
    (`make bench`, and alongside a competing busy process): 10 images in
    ~18 images/s on two streams against ~16 on one, and ~17 against ~13
    under competition; one image in ~55 ms on one stream against ~100 ms on
    a single-core stream. The second compilation costs ~130 MB resident.

    `threads` is the cores a batch runs on (0: all); `one_image_threads` those
    a lone image runs on (0: all). Both default to all, for one worker on its
    instance. Where several workers share a machine, a batch on one core each
    keeps them from contending, while a lone image, which comes when the rest
    are likely idle, may still take every core: one compilation more, of one
    thread for whole batches (~60 MB resident), as in `make bench`'s stack
    (2-core AVX-512 machine, 2 workers: 30.7-30.9 images/s at 300 @ 100
    against 26.7-27.8 with every call on all cores, and the same low-load p50).
    """

    def __init__(self, weights: str = "imagenet", threads: int = 0, one_image_threads: int = 0) -> None:
        ov = import_openvino()

        started = time.perf_counter()
        self.weights = weights
        self.untrained = weights == RANDOM_WEIGHTS
        core = ov.Core()
        network = core.read_model(str(ensure_ir(weights)))
        latency: dict = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, **COMPILE_DEFAULTS}
        cores = os.cpu_count() or 1
        one_image = {"INFERENCE_NUM_THREADS": one_image_threads} if one_image_threads > 0 else {}
        self._one = core.compile_model(network, "CPU", {**latency, **one_image})
        streams = threads if threads > 0 else cores
        self._compiled = [self._one]
        self._many = None
        # Batches on one core: the one-image model, unless that one runs on more.
        self._batch = self._one
        if streams == 1 and (one_image_threads or cores) > 1:
            self._batch = core.compile_model(network, "CPU", {**latency, "INFERENCE_NUM_THREADS": 1})
            self._compiled.append(self._batch)
        if streams > 1:
            one_core_each = {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams,
                             "INFERENCE_NUM_THREADS": streams, **COMPILE_DEFAULTS}
            many = core.compile_model(network, "CPU", one_core_each)
            self._compiled.append(many)
            self._many = ov.AsyncInferQueue(many, streams)
            self._many.set_callback(self._collect)
        # A compiled model's first inference allocates its buffers (measured: a first
        # image in ~100 ms, then ~34 ms): pay that here, for both, and not on the first
        # request a newly launched instance serves.
        self.probabilities(np.zeros((1, 224, 224, 3), dtype=np.float32))
        if len(self._compiled) > 1:
            self.probabilities(np.zeros((max(streams, 2), 224, 224, 3), dtype=np.float32))
        self.load_seconds = time.perf_counter() - started
        log.info("ResNet-50 (%s weights) on OpenVINO ready in %.1f s (%d streams for batches, "
                 "one image on %s)", weights, self.load_seconds, streams if self._many else 1,
                 f"{one_image_threads} cores" if one_image_threads else "all cores")

    def compiled_property(self, name: str) -> list:
        """One OpenVINO property (e.g. "ENABLE_CPU_PINNING") of each compiled model."""
        return [compiled.get_property(name) for compiled in self._compiled]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if len(batch) == 1:
            return self._one(batch)[0]
        if self._many is None:
            return self._batch(batch)[0]
        # Each call's own results, and none of its requests left running after it (a
        # start_async failing midway): a late one must not write into the next call's.
        results: dict[int, np.ndarray] = {}
        try:
            for index in range(len(batch)):
                self._many.start_async(batch[index:index + 1], (results, index))
        finally:
            self._many.wait_all()
        return np.concatenate([results[index] for index in range(len(batch))])

    @staticmethod
    def _collect(request: InferRequest, userdata: tuple[dict[int, np.ndarray], int]) -> None:
        results, index = userdata
        results[index] = request.get_output_tensor(0).data.copy()
