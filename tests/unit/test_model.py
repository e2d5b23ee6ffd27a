"""The model: both runtimes give the same answers, and missing weights say what to do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import boto3
import numpy as np
import pytest
from PIL import Image

from app_tier import model, weights
from app_tier.images import INPUT_SIZE, decode, prepare, to_input
from app_tier.labels import imagenet_labels
from app_tier.model import load_classifier
from app_tier.weights import WeightsUnavailable
from tests.conftest import make_image

ROOT = Path(__file__).resolve().parents[2]
# TensorFlow and OpenVINO loaded, ResNet-50 built and converted (a module fixture's cost
# falls in its first test: 28 s here), a worker run given 120 s: more than pyproject's 120 s.
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def batch():
    return np.stack([prepare(make_image(seed), 40_000_000) for seed in range(4)])


@pytest.fixture(scope="module")
def ir_cache(tmp_path_factory) -> Path:
    """One IMGCLASS_CACHE for the tests that only use the converted model: converting
    ResNet-50 costs seconds, and test_openvino_ir_is_converted_once_and_reused checks
    the conversion itself in a cache of its own."""
    return tmp_path_factory.mktemp("imgclass-cache")


@pytest.fixture(scope="module")
def tensorflow_model():
    return load_classifier("random", "tensorflow", threads=1)


def test_labels_are_keras_imagenet_classes():
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert (labels[0], labels[2], labels[999]) == ("tench", "great_white_shark", "toilet_tissue")
    # POST / answers "<name>:<label>" and a name may hold a colon: split at the last one.
    assert not [label for label in labels if ":" in label or "\n" in label]


def test_input_is_keras_resnet50_preprocessing():
    """The worker's own preprocessing must be exactly what the weights were trained with."""
    from keras.applications.resnet50 import preprocess_input

    img = decode(make_image(7), 40_000_000)
    resized = np.asarray(img.resize(INPUT_SIZE, Image.Resampling.BILINEAR), dtype=np.float32)
    ours = to_input(img)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
    assert np.array_equal(ours, preprocess_input(resized.copy()))


@pytest.mark.parametrize(("size", "fmt"), [((300, 200), "PNG"), ((400, 300), "JPEG"), ((1000, 12), "PNG"),
                                           ((100, 150), "BMP"), ((2400, 1800), "PNG")])
def test_the_whole_input_path_is_keras_load_img_with_bilinear_resizing(size, fmt):
    """What the worker feeds the model from an upload's bytes, against Keras' own path:
    load_img (squashed to 224x224, as the worker does) with interpolation="bilinear", then
    preprocess_input. load_img's default, nearest, aliases photos: the worker uses bilinear
    (measured as close to a Lanczos resize as Keras' bilinear). Only the tests of
    to_input above compare anything with Keras, and only after decoding."""
    import io

    from keras.applications.resnet50 import preprocess_input
    from keras.utils import img_to_array, load_img

    rng = np.random.default_rng(size[0])
    # Smooth content with some detail, as photos have: noise alone would make any two
    # resizes differ, flat colour none.
    y, x = np.mgrid[0:size[1], 0:size[0]]
    picture = np.stack([(x * 255 // size[0]), (y * 255 // size[1]), ((x + y) % 64) * 4], axis=-1)
    picture = np.clip(picture + rng.integers(-8, 9, picture.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(picture).save(out, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    data = out.getvalue()

    ours = prepare(data, 40_000_000)
    theirs = preprocess_input(img_to_array(load_img(io.BytesIO(data), target_size=INPUT_SIZE[::-1],
                                                    interpolation="bilinear")))
    difference = np.abs(ours - theirs)
    # Up to a rounding for most; the large PNG is box-averaged first (as Keras is not):
    # close, not equal. (A JPEG this small is decoded whole: draft() would take it under 224.)
    assert difference.mean() < 1.0 and np.percentile(difference, 99) < 6, (difference.mean(),
                                                                           difference.max())


@pytest.mark.parametrize("ov_threads", [1, 2], ids=["one-stream", "stream-per-image"])
def test_openvino_agrees_with_tensorflow(batch, ir_cache, monkeypatch, ov_threads, tensorflow_model):
    monkeypatch.setenv("IMGCLASS_CACHE", str(ir_cache))
    tf_model = tensorflow_model
    ov_model = load_classifier("random", "openvino", threads=ov_threads)
    tf_probs, ov_probs = tf_model.probabilities(batch), ov_model.probabilities(batch)
    assert tf_probs.shape == ov_probs.shape == (4, 1000)
    assert np.abs(tf_probs - ov_probs).max() < 1e-5
    for a, b in zip(tf_model.classify(batch), ov_model.classify(batch), strict=True):
        assert a.label == b.label
        assert [p.label for p in a.top5] == [p.label for p in b.top5]
    # The untrained network still scores each image differently.
    assert len({round(float(r.max()), 6) for r in ov_probs}) == 4
    assert ov_model.untrained and tf_model.untrained


@pytest.fixture(scope="module")
def network_of_class_7():
    """A ResNet-50 whose every answer is class 7: its last layer's bias for it far above
    the others. Built once: each build of ResNet-50 takes seconds."""
    network = model.build_network("random")
    predictions = network.get_layer("predictions")
    kernel, bias = predictions.get_weights()
    bias[7] = 1000.0
    predictions.set_weights([kernel, bias])
    return network


@pytest.fixture(scope="module")
def weights_of_class_7(tmp_path_factory, network_of_class_7) -> Path:
    """A weights file (MODEL_WEIGHTS=<path>) of network_of_class_7."""
    path = tmp_path_factory.mktemp("weights") / "resnet50.weights.h5"
    network_of_class_7.save_weights(str(path))
    return path


@pytest.mark.parametrize("runtime", ["tensorflow", "openvino"])
def test_weights_from_a_file_are_the_ones_used_and_not_called_untrained(runtime, weights_of_class_7, batch,
                                                                         tmp_path, monkeypatch):
    """Only "random" weights are untrained: the flag hard-wired to true passes every
    other test, which loads no other weights."""
    monkeypatch.setenv("IMGCLASS_CACHE", str(tmp_path))
    loaded = load_classifier(str(weights_of_class_7), runtime)  # threads: TensorFlow has started
    assert loaded.untrained is False
    assert [result.label for result in loaded.classify(batch)] == [imagenet_labels()[7]] * len(batch)


@pytest.mark.parametrize("kind", ["a file of Keras 3's format", "an S3 object of the older format"])
def test_weights_named_without_an_ending_keras_knows_are_read_by_their_contents(
        kind, weights_of_class_7, network_of_class_7, batch, tmp_path, s3_weights, monkeypatch):
    """Keras picks a weights file's format by its name's ending, and refuses any other:
    a key like s3://models/resnet50 would stop every worker. The ImageNet file is of
    the older format (.h5); save_weights writes Keras 3's (.weights.h5)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    monkeypatch.setenv("IMGCLASS_CACHE", str(tmp_path))
    unnamed = tmp_path / "resnet50"
    if kind == "a file of Keras 3's format":
        shutil.copyfile(weights_of_class_7, unnamed)
        weights = str(unnamed)
    else:
        with h5py.File(unnamed, "w") as older:  # the same network's weights, in the older format
            legacy_h5_format.save_weights_to_hdf5_group(older, network_of_class_7)
        s3_weights.upload_file(str(unnamed), "models", "weights/resnet50")
        weights = "s3://models/weights/resnet50"
    loaded = load_classifier(weights, "tensorflow")
    assert loaded.untrained is False
    assert [result.label for result in loaded.classify(batch)] == [imagenet_labels()[7]] * len(batch)


def test_openvino_runs_in_fp32_without_cpu_pinning(ir_cache, monkeypatch):
    """bf16 (the default on AVX512_BF16 CPUs) is 3e-3 off TensorFlow; pinned, one-thread
    workers on one machine all pin to the first core and share it."""
    monkeypatch.setenv("IMGCLASS_CACHE", str(ir_cache))
    model = load_classifier("random", "openvino", threads=2)
    assert len(model.compiled_property("ENABLE_CPU_PINNING")) == 2
    assert model.compiled_property("ENABLE_CPU_PINNING") == [False, False]
    import openvino as ov

    assert model.compiled_property("INFERENCE_PRECISION_HINT") == [ov.Type.f32, ov.Type.f32]


def test_openvino_runs_both_compiled_models_before_serving(ir_cache, monkeypatch):
    """Each compiled model's first inference is ~3x slower: a new worker must not pay it
    on its first request, whether that is one image or a batch."""
    monkeypatch.setenv("IMGCLASS_CACHE", str(ir_cache))
    from app_tier.openvino_runtime import OpenVinoResNet50

    sizes: list[int] = []
    run = OpenVinoResNet50.probabilities
    monkeypatch.setattr(OpenVinoResNet50, "probabilities",
                        lambda self, batch: sizes.append(len(batch)) or run(self, batch))
    # Batches on streams, or (given more than one core) on a compilation of one thread.
    for threads in (2, 1) if (os.cpu_count() or 1) > 1 else (2,):
        sizes.clear()
        OpenVinoResNet50("random", threads=threads, one_image_threads=0)
        assert 1 in sizes, "the one-image model was not run at load"
        assert any(n >= 2 for n in sizes), f"the batch model was not run at load (threads={threads})"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: a lone image has no more to take")
def test_openvino_batches_on_one_core_and_a_lone_image_on_all(batch, ir_cache, monkeypatch, tensorflow_model):
    """WORKER_THREADS=1 with WORKER_ONE_IMAGE_THREADS=0 (make bench's workers): a third
    compilation runs whole batches on one thread, and both give TensorFlow's answers."""
    monkeypatch.setenv("IMGCLASS_CACHE", str(ir_cache))
    model = load_classifier("random", "openvino", threads=1, one_image_threads=0)
    one, batches = model.compiled_property("INFERENCE_NUM_THREADS")
    assert one > 1 and batches == 1
    alone = np.concatenate([model.probabilities(batch[i:i + 1]) for i in range(len(batch))])
    together = model.probabilities(batch)
    expected = tensorflow_model.probabilities(batch)
    assert np.abs(alone - expected).max() < 1e-5 and np.abs(together - expected).max() < 1e-5
    # One thread for both: one compilation, not two of the same.
    assert load_classifier("random", "openvino", threads=1,
                           one_image_threads=1).compiled_property("INFERENCE_NUM_THREADS") == [1]


def test_openvino_batch_rows_are_the_images_own_results(batch, ir_cache, monkeypatch):
    """Batches run one image per stream: every row must come back in its place."""
    monkeypatch.setenv("IMGCLASS_CACHE", str(ir_cache))
    model = load_classifier("random", "openvino", threads=2)
    together = model.probabilities(batch)
    alone = np.concatenate([model.probabilities(batch[i:i + 1]) for i in range(len(batch))])
    assert np.abs(together - alone).max() < 1e-5
    assert np.abs(model.probabilities(batch[::-1]) - together[::-1]).max() < 1e-5


def test_openvino_a_batch_that_fails_midway_leaves_no_request_to_write_into_the_next(ir_cache, monkeypatch):
    """A batch runs as one async request an image. One failing to start midway left the
    others running, and a late one wrote its image's row into the next batch's results."""
    monkeypatch.setenv("IMGCLASS_CACHE", str(ir_cache))
    model = load_classifier("random", "openvino", threads=2)

    class Queue:
        """An AsyncInferQueue whose second request fails to start, and whose requests
        finish in wait_all, the last started first. Each image's "probabilities" are
        its first pixel's value."""

        def __init__(self) -> None:
            self.started = 0
            self.running: list[tuple[np.ndarray, object]] = []

        def start_async(self, inputs: np.ndarray, userdata: object) -> None:
            self.started += 1
            if self.started == 2:
                raise RuntimeError("could not start the request")
            self.running.append((inputs, userdata))

        def wait_all(self) -> None:
            while self.running:
                inputs, userdata = self.running.pop()
                output = SimpleNamespace(data=np.full((1, 3), inputs.flat[0], dtype=np.float32))
                model._collect(SimpleNamespace(get_output_tensor=lambda _, out=output: out), userdata)

    monkeypatch.setattr(model, "_many", Queue())
    with pytest.raises(RuntimeError, match="could not start"):
        model.probabilities(np.full((2, 224, 224, 3), 7, dtype=np.float32))
    batch = np.stack([np.full((224, 224, 3), value, dtype=np.float32) for value in (1, 2)])
    assert model.probabilities(batch)[:, 0].tolist() == [1, 2]


def test_openvino_ir_is_converted_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLASS_CACHE", str(tmp_path))
    from app_tier.openvino_runtime import ensure_ir

    first = ensure_ir("random")
    stamp = first.stat().st_mtime_ns
    assert ensure_ir("random") == first and first.stat().st_mtime_ns == stamp
    assert first.with_suffix(".bin").stat().st_size > 50_000_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging-")]


@pytest.mark.parametrize("runtime", ["tensorflow", "openvino"])
def test_missing_weights_file_says_what_to_set(runtime, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLASS_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailable) as info:
        load_classifier(str(tmp_path / "nope.h5"), runtime)
    message = str(info.value)
    assert "MODEL_WEIGHTS=random" in message and "s3://" in message and "nope.h5" in message


def test_a_cached_imagenet_file_that_fails_keras_check_is_said_so(tmp_path, monkeypatch):
    """Keras removes such a file when it cannot download it again: "download failed"
    alone left whoever put it there looking for the network."""
    import urllib.error

    import keras.src.backend.config
    import keras.src.utils.file_utils

    from app_tier.model import build_network
    from app_tier.weights import WEIGHTS_FILE

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras.src.backend.config, "_KERAS_DIR", str(tmp_path))  # read by Keras at import

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(keras.src.utils.file_utils, "urlretrieve", offline)
    cached = tmp_path / "models" / WEIGHTS_FILE
    cached.parent.mkdir()
    cached.write_bytes(os.urandom(100_000))
    with pytest.raises(WeightsUnavailable) as info:
        build_network("imagenet")
    message = str(info.value)
    assert f"{cached} failed Keras's hash check (cut short, or another file) and Keras removed it" in message
    assert "no network here" in message
    with pytest.raises(WeightsUnavailable, match="download failed"):  # nothing cached: as before
        build_network("imagenet")


def test_the_worker_exits_with_its_no_model_status_when_the_weights_are_missing(tmp_path, monkeypatch):
    """systemd (RestartPreventExitStatus) and the local runner do not restart on this
    status; the worker tags its instance so that the controller stops counting it."""
    from moto import mock_aws

    from app_tier import EXIT_CANNOT_START
    from app_tier.__main__ import main
    from common.fleet import WORKER_FAILED_TAG

    monkeypatch.setenv("IMGCLASS_CACHE", str(tmp_path))
    monkeypatch.setenv("MODEL_RUNTIME", "openvino")
    monkeypatch.setenv("MODEL_WEIGHTS", str(tmp_path / "nope.h5"))
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        iid = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        assert main(["--instance-id", iid]) == EXIT_CANNOT_START
        tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [iid]}])["Tags"]
    assert {t["Key"]: t["Value"] for t in tags} == {WORKER_FAILED_TAG: "model-unavailable"}


def test_the_worker_loads_its_model_with_the_threads_its_settings_give(monkeypatch):
    """WORKER_THREADS for batches, WORKER_ONE_IMAGE_THREADS for a lone image: make run's
    and the user-data's variables reach the model. Unset (or empty, as the user-data
    writes it unset), a lone image has WORKER_THREADS's, as before the variable was."""
    from app_tier.__main__ import main

    monkeypatch.setenv("MODEL_RUNTIME", "openvino")
    monkeypatch.setenv("WORKER_THREADS", "1")
    loaded = []

    def load_classifier(*args, **kwargs):
        loaded.append(args)
        raise SystemExit(9)  # enough: how the model is loaded is the question

    monkeypatch.setattr(model, "load_classifier", load_classifier)
    for one_image in ("3", "0", ""):
        monkeypatch.setenv("WORKER_ONE_IMAGE_THREADS", one_image)
        with pytest.raises(SystemExit):
            main(["--instance-id", "-"])
    assert [args[2:] for args in loaded] == [(1, 3), (1, 0), (1, 1)]


def test_a_worker_with_a_wrong_setting_says_which_in_one_line_and_is_not_restarted(monkeypatch, capfd):
    """Not a 20-line traceback and exit 1, which systemd restarts."""
    from app_tier import EXIT_CANNOT_START
    from app_tier.__main__ import main

    monkeypatch.setenv("RECEIVE_WAIT", "21")
    assert main(["--instance-id", "i-0"]) == EXIT_CANNOT_START
    err = capfd.readouterr().err.strip()
    assert err.startswith("worker: RECEIVE_WAIT ") and "\n" not in err, err


def test_imagenet_weights_unreachable_offline_says_what_to_set(tmp_path, monkeypatch):
    """An empty Keras home and no route out: Keras's download must fail, clearly, and
    the message name the folder Keras looked in. Keras reads KERAS_HOME once, at import,
    hence its folder patched too: a home with the weights in it (as the README has users
    do) would otherwise load them, and the download is refused here, not left to a
    proxy setting that NO_PROXY could undo."""
    import urllib.error

    import keras.src.backend.config
    import keras.src.utils.file_utils

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras.src.backend.config, "_KERAS_DIR", str(tmp_path))
    asked = []

    def offline(url, path, *args, **kwargs):
        asked.append(path)
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(keras.src.utils.file_utils, "urlretrieve", offline)
    with pytest.raises(WeightsUnavailable) as info:
        load_classifier("imagenet", "tensorflow")
    assert len(asked) == 1 and asked[0].startswith(str(tmp_path / "models")), asked
    assert f"resnet50_weights_tf_dim_ordering_tf_kernels.h5 in {tmp_path / 'models'}/" in str(info.value)


def test_unknown_runtime_is_refused():
    with pytest.raises(ValueError, match="MODEL_RUNTIME must be one of .* got 'pytorch'"):
        load_classifier("random", "pytorch")


def test_openvino_sends_no_usage_telemetry():
    """With no consent file, OpenVINO's converter counts as consent and sends usage
    events to Google Analytics at import; a worker must send nothing anywhere."""
    script = ("import sys\n"
              "from app_tier.openvino_runtime import import_openvino\n"
              "import_openvino()\n"
              "import openvino.tools.ovc.telemetry_utils as t\n"
              "print(t.tm.__name__)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HOME": "/nonexistent-home"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "openvino.tools.ovc.telemetry_stub"


@pytest.mark.parametrize("runtime", ["tensorflow", "openvino"])
def test_a_damaged_weights_file_is_a_model_that_cannot_load_not_a_crash(runtime, tmp_path, monkeypatch):
    """h5py's OSError went uncaught: the worker exited 1 and was restarted for ever (and
    said nothing to the controller), where exit 78 says it cannot serve."""
    monkeypatch.setenv("IMGCLASS_CACHE", str(tmp_path))
    damaged = tmp_path / "resnet50.h5"
    damaged.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsUnavailable) as info:
        load_classifier(str(damaged), runtime)
    message = str(info.value)
    assert f"{damaged} is not a ResNet-50 weights file Keras can read" in message
    assert "MODEL_WEIGHTS=random" in message


def test_s3_weights_missing_or_forbidden_stop_the_worker_but_s3_failing_does_not(s3_weights, monkeypatch):
    """Exit 78 (WeightsUnavailable) is never restarted: an S3 hiccup at first boot must
    not make a worker give its instance up for good. Only an answer no later start can
    change does that; anything else raises as it is, for systemd to restart."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    from app_tier.weights import _fetch_s3_weights

    s3_weights.put_object(Bucket="models", Key="resnet50.h5", Body=b"weights")
    assert _fetch_s3_weights("s3://models/resnet50.h5").read_bytes() == b"weights"
    for uri in ("s3://models/other.h5", "s3://no-such-bucket/resnet50.h5", "s3://models"):
        with pytest.raises(WeightsUnavailable, match="MODEL_WEIGHTS"):
            _fetch_s3_weights(uri)

    class FailingS3:
        def __init__(self, error: Exception) -> None:
            self.error = error

        def head_object(self, **kwargs):
            raise self.error

        def download_file(self, *args, **kwargs):
            raise self.error

    for error in (EndpointConnectionError(endpoint_url="https://s3.amazonaws.com"),
                  ClientError({"Error": {"Code": "SlowDown", "Message": "slow down"}}, "GetObject")):
        monkeypatch.setattr(weights, "weights_s3_client", lambda e=error: FailingS3(e))
        with pytest.raises(type(error)):
            _fetch_s3_weights("s3://models/later.h5")


@pytest.fixture
def s3_weights(tmp_path, monkeypatch):
    """moto's S3 holding a bucket "models", the Keras cache in tmp_path: an S3 client."""
    from moto import mock_aws

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="models")
        yield s3


def test_weights_come_through_a_client_with_the_services_retries(monkeypatch):
    """boto3.client's defaults were legacy retries and botocore's user agent; every other
    client of the service has standard retries (throttling, 5xx) and its own."""
    from common.aws import USER_AGENT

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    config = weights.weights_s3_client().meta.config
    assert config.retries["mode"] == "standard" and config.user_agent.startswith(USER_AGENT)


def test_s3_weights_uploaded_again_at_the_same_key_are_fetched_again(s3_weights):
    """The copy in the Keras cache was used for ever: new weights uploaded at the same key
    never reached a worker that had fetched the old ones (or an image baked with them)."""
    from app_tier.weights import _fetch_s3_weights

    uri = "s3://models/resnet50.h5"
    s3_weights.put_object(Bucket="models", Key="resnet50.h5", Body=b"weights, first version")
    first = _fetch_s3_weights(uri)
    assert first.read_bytes() == b"weights, first version"
    s3_weights.put_object(Bucket="models", Key="resnet50.h5", Body=b"weights, second version")
    again = _fetch_s3_weights(uri)
    assert again == first and again.read_bytes() == b"weights, second version"
    assert not [p for p in first.parent.iterdir() if p.name.endswith(".part")]


def test_unchanged_s3_weights_are_not_downloaded_again(s3_weights):
    from app_tier.weights import _fetch_s3_weights

    s3_weights.put_object(Bucket="models", Key="resnet50.h5", Body=b"weights")
    copy = _fetch_s3_weights("s3://models/resnet50.h5")
    before = copy.stat()
    # A new download is a new file moved into place: another inode.
    after = _fetch_s3_weights("s3://models/resnet50.h5").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_copy_fetched_without_its_s3_identity_is_fetched_again(s3_weights):
    """A copy left by an older worker (or baked into an image) says nothing of which
    upload it is: while S3 answers, it is replaced."""
    from app_tier.weights import _fetch_s3_weights, keras_cache_dir

    s3_weights.put_object(Bucket="models", Key="resnet50.h5", Body=b"current weights")
    old = keras_cache_dir() / "s3-models-resnet50.h5"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"older weights")
    assert _fetch_s3_weights("s3://models/resnet50.h5").read_bytes() == b"current weights"


@pytest.mark.parametrize("error", ["no-route", "no-credentials", "access-denied"])
def test_s3_weights_already_copied_are_used_when_s3_cannot_be_asked(error, s3_weights, monkeypatch, caplog):
    """No network (or no credentials) at start: the copy fetched before still serves, and
    the log says once that it could not be checked, and why."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    from app_tier.weights import _fetch_s3_weights

    s3_weights.put_object(Bucket="models", Key="resnet50.h5", Body=b"weights")
    copy = _fetch_s3_weights("s3://models/resnet50.h5")
    failure = {"no-route": EndpointConnectionError(endpoint_url="https://s3.amazonaws.com"),
               "no-credentials": NoCredentialsError(),
               "access-denied": ClientError({"Error": {"Code": "403", "Message": "Forbidden"}},
                                            "HeadObject")}[error]

    class UnreachableS3:
        def head_object(self, **kwargs):
            raise failure

        def download_file(self, *args, **kwargs):
            raise failure

    monkeypatch.setattr(weights, "weights_s3_client", UnreachableS3)
    caplog.set_level("WARNING", logger="app_tier.weights")
    assert _fetch_s3_weights("s3://models/resnet50.h5") == copy
    assert copy.read_bytes() == b"weights"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert str(copy) in warnings[0] and "s3://models/resnet50.h5" in warnings[0]
    assert str(failure) in warnings[0]


def test_openvino_ir_of_s3_weights_is_rebuilt_when_the_object_changes(s3_weights, tmp_path, monkeypatch):
    """The IR was named after the s3:// URI and, once there, never checked against S3:
    a worker kept serving a network converted from the old weights."""
    from app_tier import openvino_runtime
    from app_tier.weights import _fetch_s3_weights

    monkeypatch.setenv("IMGCLASS_CACHE", str(tmp_path / "ir"))

    class FakeOpenVino:
        """Converts a "network" (the weights' bytes) to an IR holding those bytes."""

        @staticmethod
        def convert_model(network, **kwargs):
            return network

        @staticmethod
        def save_model(model, path, **kwargs):
            Path(path).write_bytes(model)
            Path(path).with_suffix(".bin").write_bytes(model)

    def network_of(weights: str, file: Path | None = None) -> bytes:
        return (file or _fetch_s3_weights(weights)).read_bytes()

    monkeypatch.setattr(openvino_runtime, "import_openvino", lambda: FakeOpenVino)
    monkeypatch.setattr(openvino_runtime, "build_network", network_of)
    uri = "s3://models/resnet50.h5"
    s3_weights.put_object(Bucket="models", Key="resnet50.h5", Body=b"weights, first version")
    first = openvino_runtime.ensure_ir(uri)
    assert first.read_bytes() == b"weights, first version"
    assert openvino_runtime.ensure_ir(uri) == first
    # Another size as well: two downloads within one tick of the file system's clock
    # can share an mtime, where a real upload comes a start later.
    s3_weights.put_object(Bucket="models", Key="resnet50.h5", Body=b"weights, second version!")
    assert openvino_runtime.ensure_ir(uri).read_bytes() == b"weights, second version!"
