"""The embedded AWS's server (localaws/moto_server.py): its warm-up, and its end with its worker."""

from __future__ import annotations

import time

import boto3
import pytest
from moto import mock_aws
from moto.sqs import models

from localaws import moto_server
from localaws.moto_middleware import aws_action
from tests.unit.test_moto_patches import patched


@pytest.fixture(name="patched")
def patched_fixture(monkeypatch):
    """The server warms up moto as it patched it."""
    return patched(monkeypatch)


def loaded_regions(backend_dict) -> set[str]:
    """The regions (or partitions) of one moto service whose backend exists, without creating any."""
    return {region for account in dict.values(backend_dict) for region in dict.keys(account)}


def test_warm_up_builds_ec2_sqs_and_s3_with_one_read_only_call_each(patched):
    """The server builds its backends before it freezes its start-up heap (common.heap)."""
    from moto.ec2.models import ec2_backends
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.s3.models import s3_backends

    moto_app = DomainDispatcherApplication(create_backend_app)
    seen = []

    def recording(environ, start_response):
        seen.append(aws_action(environ))
        return moto_app(environ, start_response)

    with mock_aws():  # moto's state is reset on the way out
        assert "eu-west-3" not in loaded_regions(ec2_backends) | loaded_regions(models.sqs_backends)
        moto_server.warm_up(recording, "eu-west-3")
        assert seen == ["DescribeInstances", "ListQueues", "S3 GET bucket"]
        assert "eu-west-3" in loaded_regions(ec2_backends) & loaded_regions(models.sqs_backends)
        assert loaded_regions(s3_backends)
        ec2 = boto3.client("ec2", region_name="eu-west-3")
        assert ec2.describe_instances()["Reservations"] == []
        assert "QueueUrls" not in boto3.client("sqs", region_name="eu-west-3").list_queues()
        assert boto3.client("s3", region_name="eu-west-3").list_buckets()["Buckets"] == []


def test_a_failed_warm_up_call_stops_the_server_from_starting():
    def broken_sqs(environ, start_response):
        status = "500 Internal Server Error" if environ.get("HTTP_X_AMZ_TARGET") else "200 OK"
        start_response(status, [("Content-Type", "text/xml")])
        return [b""]

    with pytest.raises(RuntimeError, match="500"):
        moto_server.warm_up(broken_sqs, "us-east-1")



def test_the_server_ends_when_its_worker_dies():
    """Its one worker holds everything: killed (the OOM killer) and replaced by an empty
    one, the stack would run on against an AWS that has forgotten it all."""
    import signal
    import subprocess
    import sys

    import psutil

    from tests.conftest import loopback_listener

    with loopback_listener() as listener:  # the server's: no port let go for another to take
        port = listener.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "localaws.moto_server", "-H", "127.0.0.1",
                                   "-p", str(port), "--fd", str(listener.fileno())],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  pass_fds=(listener.fileno(),))
    try:
        deadline = time.monotonic() + 60
        while not psutil.Process(server.pid).children() and time.monotonic() < deadline:
            time.sleep(0.1)
        [worker] = psutil.Process(server.pid).children()
        worker.send_signal(signal.SIGKILL)
        assert server.wait(timeout=30) == 1
        assert b"died: everything it held is gone" in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
