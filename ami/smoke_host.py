"""The host's side of ami/smoke.sh: the embedded AWS's contents, a stand-in for the
instance metadata service, and the requests the booted image must answer.

    python ami/smoke_host.py launch STATE_DIR     buckets, queues, one instance launched as
                                                  the controller launches it; its id and
                                                  user-data into STATE_DIR
    python ami/smoke_host.py imds STATE_DIR PORT  serve IMDSv2 for that instance until killed
    python ami/smoke_host.py weights STATE_DIR    a ResNet-50 weights file (Keras's own random
                                                  initialisation, not ImageNet's) put in S3;
                                                  prints its s3:// URI
    python ami/smoke_host.py send STATE_DIR NAME  one image in the input bucket, its request
                                                  on the request queue (kept as NAME.json)
    python ami/smoke_host.py burst STATE_DIR NAME COUNT
                                                  COUNT requests at once; returns as soon as the
                                                  first of them is answered (kept as NAME.json,
                                                  added to those an earlier burst NAME sent)
    python ami/smoke_host.py answers STATE_DIR NAME DEADLINE_S
                                                  wait until every request of the burst NAME
                                                  is answered by the instance
    python ami/smoke_host.py answer STATE_DIR NAME SINCE DEADLINE_S
                                                  wait for NAME's answer, its output object and
                                                  the instance's ready tag; check them

Every call reaches the embedded AWS that smoke.sh's environment names (AWS_ENDPOINT_URL),
signed with throwaway keys made here, never with whatever credentials the shell has.
Run from the repository's root with it on PYTHONPATH, as a script (not -m): no bytecode
is left in ami/, whose every file bake.sh packs.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import sys
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common.aws import Aws
from common.config import Settings
from common.fleet import WORKER_READY_TAG
from common.messages import ClassifyRequest, ClassifyResponse
from common.names import object_key
from common.output_object import pair_text
from common.provision import provision
from common.sqs import sqs_batches
from controller.act import launch
from web_tier.storage import put_input

FILENAME = "smoke-test.png"
# The role the stand-in IMDS names, as the instance profile of ami/README.md's IAM section would.
ROLE = "imgclass-worker"


def settings() -> Settings:
    s = Settings.from_env()
    if not s.endpoint_url:
        raise SystemExit("smoke_host: AWS_ENDPOINT_URL is not set: this talks to the embedded AWS only")
    return s


def local_aws(s: Settings) -> Aws:
    # The embedded AWS takes any key: made up here, so that no real one is ever sent.
    return Aws(s, keys=("SMOKE" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)))


def cmd_launch(state: Path) -> None:
    s = settings()
    aws = local_aws(s)
    provision(s, aws)
    # The controller's own launch: its tags, its IMDSv2 options and, above all, the
    # user-data it renders from ami/user-data.sh with its worker settings.
    instance_id = launch(aws, s, (1,))[1]
    encoded = aws.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    user_data = base64.b64decode(encoded["UserData"]["Value"])
    (state / "user-data").write_bytes(user_data)
    (state / "instance-id").write_text(instance_id + "\n")
    print(f"launched {instance_id} in the embedded AWS; its user-data is {len(user_data)} bytes")


class Imds(BaseHTTPRequestHandler):
    """IMDSv2 as EC2 answers the calls made here: a token first (PUT, with a TTL), then
    reads that carry it; a read without a valid token is refused with 401, as on an
    instance launched with HttpTokens=required."""

    instance_id = ""
    user_data = b""
    keys: dict[str, str] = {}
    tokens: dict[str, float] = {}

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write(f"imds: {self.command} {self.path} -> {fmt % args}\n")

    def _reply(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:  # noqa: N802 (http.server's name)
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if self.path != "/latest/api/token" or not ttl.isdecimal() or not 1 <= int(ttl) <= 21600:
            self._reply(400)
            return
        token = secrets.token_urlsafe(32)
        self.tokens[token] = time.monotonic() + int(ttl)
        self._reply(200, token.encode())

    def do_GET(self) -> None:  # noqa: N802
        if self.tokens.get(self.headers.get("X-aws-ec2-metadata-token", ""), 0) < time.monotonic():
            self._reply(401)
            return
        creds = "/latest/meta-data/iam/security-credentials/"
        if self.path == "/latest/meta-data/instance-id":
            self._reply(200, self.instance_id.encode())
        elif self.path == "/latest/user-data":
            self._reply(200, self.user_data)
        elif self.path == creds:
            self._reply(200, ROLE.encode())
        elif self.path == creds + ROLE:
            now = datetime.now(UTC)
            self._reply(200, json.dumps({
                "Code": "Success", "Type": "AWS-HMAC", "LastUpdated": f"{now:%Y-%m-%dT%H:%M:%SZ}",
                "Expiration": f"{now + timedelta(hours=6):%Y-%m-%dT%H:%M:%SZ}", **self.keys,
            }).encode(), "application/json")
        else:
            self._reply(404)


def cmd_imds(state: Path, port: int) -> None:
    Imds.instance_id = (state / "instance-id").read_text().strip()
    Imds.user_data = (state / "user-data").read_bytes()
    # Throwaway keys, made here: the embedded AWS takes any, and nothing real is ever named.
    Imds.keys = {"AccessKeyId": "ASIA" + secrets.token_hex(8).upper(),
                 "SecretAccessKey": secrets.token_urlsafe(30), "Token": secrets.token_urlsafe(60)}
    server = ThreadingHTTPServer(("127.0.0.1", port), Imds)
    print(f"imds: serving {Imds.instance_id} on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


def cmd_weights(state: Path) -> None:
    import keras

    s = settings()
    aws = local_aws(s)
    path = state / "resnet50.weights.h5"
    keras.applications.ResNet50(weights=None).save_weights(str(path))
    bucket, key = f"{s.prefix}-models", "resnet50/smoke.weights.h5"
    aws.s3.create_bucket(Bucket=bucket)
    aws.s3.upload_file(str(path), bucket, key)
    print(f"s3://{bucket}/{key}")


def png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(out, format="PNG")
    return out.getvalue()


def stored_request(aws: Aws, image: bytes) -> ClassifyRequest:
    """`image` stored in the input bucket, as the web tier stores an upload, and the
    request that names it (not sent)."""
    batch, item = secrets.token_hex(16), secrets.token_hex(16)
    key = object_key(batch, item, FILENAME)
    put_input(aws, key, image, "image/png", filename=FILENAME, batch_id=batch, item_id=item)
    return ClassifyRequest(id=item, bucket=aws.settings.input_bucket, key=key, filename=FILENAME)


def cmd_send(state: Path, name: str) -> None:
    s = settings()
    aws = local_aws(s)
    request = stored_request(aws, png())
    aws.sqs.send_message(QueueUrl=aws.queue_url(s.request_queue), MessageBody=request.to_json())
    (state / f"{name}.json").write_text(request.to_json())
    print(f"sent request {request.id} for s3://{s.input_bucket}/{request.key}")


def cmd_burst(state: Path, name: str, count: int) -> int:
    s = settings()
    aws = local_aws(s)
    image, queue_url = png(), aws.queue_url(s.request_queue)
    requests = [stored_request(aws, image) for _ in range(count)]
    kept = state / f"{name}.json"
    earlier = json.loads(kept.read_text()) if kept.exists() else []
    kept.write_text(json.dumps(earlier + [r.to_json() for r in requests]))
    # Sent at once, so that the worker holds some of them (received, not yet answered)
    # whenever it is killed in the burst.
    for chunk in sqs_batches(requests):
        entries = [{"Id": str(n), "MessageBody": r.to_json()} for n, r in enumerate(chunk)]
        aws.sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for r in requests:
            try:
                aws.s3.head_object(Bucket=s.output_bucket, Key=r.key)
            except aws.s3.exceptions.ClientError:
                continue
            return 0
        time.sleep(0.05)
    print("smoke_host: no request of the burst was answered within 120 s", file=sys.stderr)
    return 1


def cmd_answers(state: Path, name: str, deadline_s: float) -> int:
    s = settings()
    aws = local_aws(s)
    bodies = json.loads((state / f"{name}.json").read_text())
    requests = {r.id: r for r in map(ClassifyRequest.from_json, bodies)}
    instance_id = (state / "instance-id").read_text().strip()
    resp_url, answered, wrong = aws.queue_url(s.response_queue), set(), []
    start = time.monotonic()
    while len(answered) < len(requests) and time.monotonic() - start < deadline_s:
        for message in aws.sqs.receive_message(QueueUrl=resp_url, MaxNumberOfMessages=10,
                                               WaitTimeSeconds=2).get("Messages", []):
            response = ClassifyResponse.from_json(message["Body"])
            if response.id in requests:
                answered.add(response.id)
                if not response.ok or response.worker != instance_id:
                    wrong.append(response.to_json())
            aws.sqs.delete_message(QueueUrl=resp_url, ReceiptHandle=message["ReceiptHandle"])
    print(f"{len(answered)} of {len(requests)} answered within {time.monotonic() - start:.1f} s")
    for body in wrong:
        print(f"FAIL: a wrong answer: {body}")
    return 0 if len(answered) == len(requests) and not wrong else 1


def cmd_answer(state: Path, name: str, since: float, deadline_s: float) -> int:
    s = settings()
    aws = local_aws(s)
    request = ClassifyRequest.from_json((state / f"{name}.json").read_text())
    instance_id = (state / "instance-id").read_text().strip()
    resp_url = aws.queue_url(s.response_queue)
    deadline = time.monotonic() + deadline_s
    answer: ClassifyResponse | None = None
    while answer is None and time.monotonic() < deadline:
        for message in aws.sqs.receive_message(QueueUrl=resp_url, MaxNumberOfMessages=10,
                                               WaitTimeSeconds=5).get("Messages", []):
            response = ClassifyResponse.from_json(message["Body"])
            if response.id == request.id:
                answer = response
                aws.sqs.delete_message(QueueUrl=resp_url, ReceiptHandle=message["ReceiptHandle"])
    answered_after = time.time() - since
    if answer is None:
        print(f"FAIL: no answer on {s.response_queue} within {deadline_s:.0f} s")
        return 1
    failures = []
    print(f"answer after {answered_after:.1f} s: {answer.to_json()}")
    if not answer.ok:
        failures.append(f"the answer is an error: {answer.error}")
    if answer.worker != instance_id:
        failures.append(f"answered by {answer.worker!r}, not the instance {instance_id}")
    if answer.untrained != (s.model_weights == "random"):
        failures.append(f"MODEL_WEIGHTS={s.model_weights}, yet the answer says untrained={answer.untrained}")
    if answer.key != request.key or answer.filename != request.filename:
        failures.append("the answer names another upload")
    text = aws.s3.get_object(Bucket=s.output_bucket, Key=request.key)["Body"].read().decode()
    print(f"s3://{s.output_bucket}/{request.key}: {text!r}")
    if answer.ok and text != pair_text(request.filename, answer.label or ""):
        failures.append(f"the output object is {text!r}, not the answer's name,label")
    # The worker tags its instance once it has received, beside serving: give it a moment.
    tags: dict[str, str] = {}
    while time.monotonic() < deadline:
        described = aws.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}])
        tags = {t["Key"]: t["Value"] for t in described["Tags"]}
        if WORKER_READY_TAG in tags:
            break
        time.sleep(1)
    if WORKER_READY_TAG not in tags:
        failures.append(f"the worker never tagged {instance_id} {WORKER_READY_TAG}")
    (state / f"{name}.answered-after").write_text(f"{answered_after:.1f}\n")
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    arguments = {"launch": 2, "imds": 3, "weights": 2, "send": 3, "burst": 4, "answers": 4, "answer": 5}
    if not argv or len(argv) != arguments.get(argv[0]):
        print(__doc__, file=sys.stderr)
        return 2
    state = Path(argv[1])
    if argv[0] == "launch":
        cmd_launch(state)
    elif argv[0] == "imds":
        cmd_imds(state, int(argv[2]))
    elif argv[0] == "weights":
        cmd_weights(state)
    elif argv[0] == "send":
        cmd_send(state, argv[2])
    elif argv[0] == "burst":
        return cmd_burst(state, argv[2], int(argv[3]))
    elif argv[0] == "answers":
        return cmd_answers(state, argv[2], float(argv[3]))
    else:
        return cmd_answer(state, argv[2], float(argv[3]), float(argv[4]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
