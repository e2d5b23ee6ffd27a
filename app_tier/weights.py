"""Where ResNet-50's weights come from (`MODEL_WEIGHTS`), and what to do when they
are missing.

imagenet is Keras's own cache, a path a local file, s3://bucket/key a copy in the
Keras cache kept up to date with S3, random a seed (app_tier/model.py builds the
network from any of them). Every way of failing says what to set.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from common.aws_errors import NOT_FOUND_CODES
from common.config import weights_on_this_host

if TYPE_CHECKING:
    from botocore.client import BaseClient

log = logging.getLogger(__name__)

WEIGHTS_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels.h5"


class WeightsUnavailable(RuntimeError):
    """The requested weights cannot be loaded; the message says what to set."""


# The endings by which Keras's load_weights picks a file's format; any other it refuses.
KERAS_WEIGHTS_ENDINGS = (".weights.h5", ".keras", ".h5", ".hdf5")


@contextmanager
def named_for_keras(path: Path) -> Iterator[Path]:
    """`path`, or while the context lasts a link to it whose name ends as Keras needs to
    read it: Keras refuses an S3 key or file named otherwise ("resnet50", "weights.bin"),
    "File format not supported". An HDF5 file whose root names its layers is
    the older format the ImageNet file has (.h5); another is Keras 3's save_weights
    (.weights.h5). A file h5py cannot open keeps its name, for Keras to say what it is not."""
    if path.name.endswith(KERAS_WEIGHTS_ENDINGS):
        yield path
        return
    import h5py

    try:
        with h5py.File(path, "r") as weights:
            older = "layer_names" in weights.attrs or "model_weights" in weights  # a whole model's
            ending = ".h5" if older else ".weights.h5"
    except OSError:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="imgclass-weights-") as folder:
        link = Path(folder) / f"resnet50{ending}"
        link.symlink_to(path.resolve())
        yield link


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def missing_weights_message(detail: str) -> str:
    return (
        f"ResNet-50 ImageNet weights are not available: {detail}\n"
        f"Do one of these:\n"
        f"  - put {WEIGHTS_FILE} in {keras_cache_dir()}/ (Keras downloads it there "
        f"once when the internet is reachable), or\n"
        f"  - set MODEL_WEIGHTS=/path/to/{WEIGHTS_FILE}, or\n"
        f"  - set MODEL_WEIGHTS=s3://<bucket>/<key> of that file, or\n"
        f"  - set MODEL_WEIGHTS=random for an UNTRAINED network (tests and offline demos "
        f"only: its labels are meaningless)."
    )


# S3's answers that no later start of the worker can change: the operator must act
# (WeightsUnavailable, exit 78, not restarted). Anything else (S3 failing, no route
# yet, credentials not yet there at first boot) raises as it is: systemd restarts.
WEIGHTS_NOT_THERE = NOT_FOUND_CODES | {"403", "AccessDenied", "AllAccessDisabled"}


def _s3_identity(head: dict) -> dict:
    """What tells one upload of an object from another, as recorded beside its copy."""
    return {"etag": head["ETag"], "size": head["ContentLength"],
            "last_modified": head["LastModified"].isoformat()}


def _recorded_identity(sidecar: Path) -> dict | None:
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None  # none yet (a copy by an older worker), or unreadable: fetch again


def weights_s3_client() -> BaseClient:
    """The S3 client weights are fetched with: the service's own session and retries
    (common.aws), endpoint and credentials from boto3's defaults, as for every client."""
    from common.aws import client_config, new_session

    return new_session().client("s3", config=client_config())


def _fetch_s3_weights(uri: str) -> Path:
    """The local copy of an S3 weights file, fetched again when S3 holds another upload.

    Each start asks S3 (HEAD) for the object's ETag, size and time of upload and
    compares them with those recorded beside the copy when it was fetched: new
    weights uploaded at the same key reach every worker at its next start, and
    the 100 MB file is neither downloaded nor hashed while it is unchanged.
    """
    from botocore.exceptions import ClientError

    from common.aws_errors import AWS_ERRORS, error_code

    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        raise WeightsUnavailable(missing_weights_message(f"{uri!r} is not s3://bucket/key"))
    target = keras_cache_dir() / f"s3-{bucket}-{key.replace('/', '_')}"
    sidecar = target.with_name(f"{target.name}.s3.json")
    s3 = weights_s3_client()
    try:
        current = _s3_identity(s3.head_object(Bucket=bucket, Key=key))
    except AWS_ERRORS as exc:
        if target.exists():
            # A worker that cannot ask S3 (no route, no credentials yet, access taken
            # away) still serves the weights it fetched before, rather than none.
            log.warning("using %s, the copy of %s fetched earlier, without knowing whether S3 "
                        "now holds other weights there: S3 could not be asked (%s)", target, uri, exc)
            return target
        if isinstance(exc, ClientError) and error_code(exc) in WEIGHTS_NOT_THERE:
            raise WeightsUnavailable(missing_weights_message(f"cannot download {uri}: {exc}")) from exc
        raise  # S3 failing (throttled, 5xx, unreachable): another start may well succeed
    if target.exists() and _recorded_identity(sidecar) == current:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Workers starting together on one machine (the local stack) download it once.
    with open(target.parent / ".s3-fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists() and _recorded_identity(sidecar) == current:
            return target
        partial = target.with_suffix(".part")
        try:
            s3.download_file(bucket, key, str(partial))
        except ClientError as exc:
            if error_code(exc) not in WEIGHTS_NOT_THERE:
                raise  # S3 failing (throttled, 5xx): another start may well succeed
            raise WeightsUnavailable(missing_weights_message(f"cannot download {uri}: {exc}")) from exc
        # No record while the copy is replaced: a copy without one is fetched again.
        # Should the object change between the HEAD and the download, the record
        # names the older upload, and the next start fetches it once more.
        sidecar.unlink(missing_ok=True)
        partial.rename(target)
        record = sidecar.with_suffix(".part")
        record.write_text(json.dumps(current))
        record.rename(sidecar)
    log.info("fetched %s to %s", uri, target)
    return target


def weights_file(weights: str) -> Path | None:
    """The file these weights load from: for s3://, the local copy, brought up to date
    first; None for imagenet and random (Keras's own cache, and a seed)."""
    if weights.startswith("s3://"):
        return _fetch_s3_weights(weights)
    return Path(weights) if weights_on_this_host(weights) else None
