"""ResNet-50 (ImageNet): the Keras network, run by TensorFlow or OpenVINO.

`MODEL_WEIGHTS` chooses the weights:
  imagenet          the Keras cache (~/.keras/models), downloaded once where the
                    internet is reachable;
  /path/to/file.h5  a local weights file;
  s3://bucket/key   a weights file in S3, copied to the Keras cache and fetched
                    again when S3 holds another upload at that key;
  random            untrained weights from a fixed seed, for tests and offline
                    demos. Every answer is then flagged `untrained`.

`MODEL_RUNTIME` chooses what runs it:
  openvino (default) the same Keras network converted once to OpenVINO's IR
                    and cached on disk (see app_tier/openvino_runtime.py):
                    it starts several times faster than TensorFlow, in about
                    half the memory (README, Speed, has the figures);
  tensorflow        the Keras network through one traced tf.function.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app_tier.labels import imagenet_labels
from app_tier.weights import (
    WEIGHTS_FILE,
    WeightsUnavailable,
    keras_cache_dir,
    missing_weights_message,
    named_for_keras,
    weights_file,
)
from common.config import MODEL_RUNTIMES, RANDOM_WEIGHTS
from common.messages import Prediction

if TYPE_CHECKING:  # each imported only where it is used: TensorFlow takes seconds
    import keras

log = logging.getLogger(__name__)

# Fixed so that every worker (and a test) builds the very same untrained network.
RANDOM_WEIGHTS_SEED = 546


@dataclass(frozen=True)
class Classification:
    label: str
    score: float
    top5: tuple[Prediction, ...]


def build_network(weights: str, file: Path | None = None) -> keras.Model:
    """The Keras ResNet-50 with the requested weights loaded (imports TensorFlow).

    `file`: `weights_file(weights)` when the caller has it already, so that an
    s3:// object is not checked (and perhaps fetched) a second time.
    """
    import keras

    if weights == RANDOM_WEIGHTS:
        keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
        return keras.applications.ResNet50(weights=None)
    if weights == "imagenet":
        cached = keras_cache_dir() / WEIGHTS_FILE
        was_cached = cached.exists()
        if not was_cached:
            log.info("ImageNet weights not cached; asking Keras to download them")
        try:
            return keras.applications.ResNet50(weights="imagenet")
        except Exception as exc:  # Keras raises several kinds when offline
            if cached.exists():
                detail = f"{cached} could not be read ({exc}): delete it, and Keras downloads it again"
            elif was_cached:
                # Keras checks a cached file's hash, and one that fails is downloaded
                # again: that download failing removes it, and "download failed" alone
                # never said the file put there was the wrong one.
                detail = (f"{cached} failed Keras's hash check (cut short, or another file) and Keras "
                          f"removed it; downloading it again failed ({exc})")
            else:
                detail = f"download failed ({exc})"
            raise WeightsUnavailable(missing_weights_message(detail)) from exc
    path = file or weights_file(weights)
    if not path.is_file():
        raise WeightsUnavailable(missing_weights_message(f"no file at {path}"))
    model = keras.applications.ResNet50(weights=None)
    try:
        with named_for_keras(path) as named:
            model.load_weights(str(named))
    except Exception as exc:  # h5py's OSError, Keras's ValueError for another network's...
        # Loading it again would fail the same way: this is no crash to restart after.
        copy = f" (a copy of {weights}: delete it to fetch it again)" if weights.startswith("s3://") else ""
        raise WeightsUnavailable(missing_weights_message(
            f"{path}{copy} is not a ResNet-50 weights file Keras can read ({exc})")) from exc
    return model


class Classifier:
    """Top-5 over ImageNet classes for a batch; subclasses supply `probabilities`."""

    untrained: bool
    weights: str
    load_seconds: float = 0.0

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def classify(self, batch: np.ndarray) -> list[Classification]:
        """Top-1 label, its score and the top 5, for each image in an (N,224,224,3) batch."""
        if len(batch) == 0:
            return []
        labels = imagenet_labels()
        out = []
        for probs in self.probabilities(batch):
            best = np.argsort(probs)[::-1][:5]
            top5 = tuple(Prediction(labels[i], float(probs[i])) for i in best)
            out.append(Classification(label=top5[0].label, score=top5[0].score, top5=top5))
        return out


class TensorFlowResNet50(Classifier):
    """Batch classification with one traced graph, reused for every call.

    Calling the model through `tf.function` avoids `model.predict`'s per-call
    set-up (measured here at about 60 ms a call).
    """

    def __init__(self, weights: str = "imagenet", threads: int = 0) -> None:
        import tensorflow as tf

        if threads > 0:
            # Must happen before TensorFlow runs its first op.
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        started = time.perf_counter()
        self.weights = weights
        self.untrained = weights == RANDOM_WEIGHTS
        network = build_network(weights)
        self._forward = tf.function(
            lambda x: network(x, training=False),
            input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)],
            # Nothing to convert in a plain forward pass, and autograph would
            # leave generated source files behind in /tmp.
            autograph=False,
        )
        self._tf = tf
        self.classify(np.zeros((1, 224, 224, 3), dtype=np.float32))  # trace once, now
        self.load_seconds = time.perf_counter() - started
        log.info("ResNet-50 (%s weights) ready in %.1f s", weights, self.load_seconds)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self._forward(self._tf.constant(batch, dtype=self._tf.float32)).numpy()


def load_classifier(weights: str, runtime: str = "openvino", threads: int = 0,
                    one_image_threads: int = 0) -> Classifier:
    """The classifier a worker (or a test, or the benchmark) should use.

    `one_image_threads` is OpenVINO's only: TensorFlow sets its threads once a process.
    """
    if runtime == "tensorflow":
        return TensorFlowResNet50(weights, threads=threads)
    if runtime == "openvino":
        from app_tier.openvino_runtime import OpenVinoResNet50

        return OpenVinoResNet50(weights, threads=threads, one_image_threads=one_image_threads)
    raise ValueError(f"MODEL_RUNTIME must be one of {MODEL_RUNTIMES}, got {runtime!r}")
