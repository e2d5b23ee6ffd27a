"""The AMI files in ami/: scripts parse, the boot script does its job, the policy is tight.

Nothing here touches AWS or needs Packer: the user-data runs against stub `curl`
and `systemctl`, and bake.sh against a stub `packer`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from app_tier import EXIT_CANNOT_START, EXIT_GAVE_UP
from common.config import Settings, worker_environment
from common.fleet import WORKER_FAILED_TAG, WORKER_READY_TAG
from common.names import PREFIX_TAG, ROLE_APP_TIER, ROLE_TAG
from controller.act import render_user_data

AMI = Path(__file__).resolve().parents[2] / "ami"
# Its scripts are given 120 s each (subprocess.run): the test, more (pyproject's 120 s).
pytestmark = pytest.mark.timeout(300)
PLACEHOLDERS = tuple("{{" + name + "}}" for name in worker_environment(Settings()))
BUCKETS = ("imgclass-in-bucket", "imgclass-out-bucket")
QUEUES = ("imgclass-req-queue", "imgclass-resp-queue", "imgclass-req-dlq")


def write_stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


# --- shell scripts ------------------------------------------------------------------


def test_every_shell_script_parses():
    scripts = sorted(AMI.glob("*.sh"))
    assert {p.name for p in scripts} >= {"bake.sh", "provision.sh", "user-data.sh"}
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
        assert "set -euo pipefail" in script.read_text(), script.name


def test_no_credentials_anywhere_in_ami():
    secret = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|PRIVATE KEY-----", re.IGNORECASE)
    for path in AMI.iterdir():
        assert not secret.search(path.read_text()), path.name


# --- user-data ----------------------------------------------------------------------


def test_user_data_template_has_each_placeholder():
    text = (AMI / "user-data.sh").read_text()
    for placeholder in PLACEHOLDERS:
        assert placeholder in text


def render(endpoint_url: str | None = None, **settings) -> str:
    settings = {"region": "eu-west-1", "prefix": "myapp", "model_weights": "s3://models/resnet50.h5",
                "endpoint_url": endpoint_url, **settings}
    return render_user_data(Settings(**settings))


def test_rendered_user_data_is_complete_and_far_below_the_16_kb_limit():
    text = render("http://10.0.0.5:5000")
    assert not re.search(r"\{\{[A-Z_]+\}\}", text), "a placeholder was left unrendered"
    assert len(text.encode()) < 4096  # a quarter of EC2's 16 KB
    result = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def boot(tmp_path):
    """Runs rendered user-data with stub IMDS and systemctl; returns (result, etc dir, systemctl log)."""
    bin_dir, etc_dir = tmp_path / "bin", tmp_path / "etc-imgclass"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl.log"
    # Answers like IMDSv2: the instance id only for a request carrying the token.
    write_stub(bin_dir, "curl", f"""
echo "$*" >> "{tmp_path / 'curl.log'}"
case "$*" in
  *"-X PUT"*ttl-seconds*/api/token*) echo -n TOKEN123 ;;
  *"X-aws-ec2-metadata-token: TOKEN123"*/meta-data/instance-id*) echo -n i-0abc123def4567890 ;;
  *) echo "curl stub: unexpected call: $*" >&2; exit 22 ;;
esac
""")
    write_stub(bin_dir, "systemctl", f'echo "$*" >> "{calls}"\n')

    def run(text: str, imds_fails: bool = False):
        if imds_fails:
            write_stub(bin_dir, "curl", "exit 7\n")
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "IMGCLASS_ETC_DIR": str(etc_dir)}
        result = subprocess.run(["bash", "-s"], input=text, env=env, capture_output=True, text=True)
        return result, etc_dir, calls

    return run


def test_an_instance_launched_gets_the_boot_script_itself(monkeypatch):
    """Encoded by the controller and again by boto3, the script would reach an instance
    as base64 text, which cloud-init does not run, so no worker would ever start on AWS."""
    import base64

    from moto import mock_aws

    from common.aws import Aws
    from controller.act import launch

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    with mock_aws():
        settings = Settings()
        aws = Aws(settings)
        instance_id = launch(aws, settings, (1,))[1]
        attribute = aws.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        served = base64.b64decode(attribute["UserData"]["Value"]).decode()  # as IMDS serves it
    assert served == render_user_data(settings) and served.startswith("#!/bin/bash")


def test_user_data_writes_worker_env_from_imdsv2_and_starts_the_service(boot):
    result, etc_dir, calls = boot(render())
    assert result.returncode == 0, result.stderr

    lines = (etc_dir / "worker.env").read_text().splitlines()
    assert lines == [
        "AWS_REGION=eu-west-1",
        "AWS_DEFAULT_REGION=eu-west-1",
        "APP_PREFIX=myapp",
        "MODEL_WEIGHTS=s3://models/resnet50.h5",
        "MODEL_RUNTIME=openvino",
        "WORKER_THREADS=0",
        "WORKER_ONE_IMAGE_THREADS=",  # unset: as WORKER_THREADS
        "RECEIVE_BATCH=10",
        "RECEIVE_WAIT=20",
        "VISIBILITY_TIMEOUT=60",
        "RETRY_DELAY=5",
        "SHUTDOWN_GRACE=20",
        "STALL_TIMEOUT=300",
        "MAX_RECEIVE_COUNT=3",
        "MAX_IMAGE_PIXELS=40000000",
        "MAX_UPLOAD_BYTES=10485760",
        "INSTANCE_ID=i-0abc123def4567890",
    ]
    assert stat.S_IMODE((etc_dir / "worker.env").stat().st_mode) == 0o600
    assert calls.read_text().splitlines() == ["enable --now --no-block imgclass-worker.service"]


def test_user_datas_metadata_calls_are_bounded_and_retried_within_the_tokens_life(boot, tmp_path):
    """Unbounded, a stalled metadata connection held cloud-init for good; with curl's
    doubling backoff and a 60 s token, a slow IMDS expired the token between retries,
    its 401 ended the script, and no worker ran until READY_DEADLINE."""
    result, _, _ = boot(render())
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "curl.log").read_text().splitlines()
    assert len(calls) == 2
    for call in calls:
        flags = dict(re.findall(r"--([a-z-]+) (\d+)", call))
        assert int(flags["max-time"]) <= 10 and "--retry-all-errors" in call, call
        assert int(flags["retry-max-time"]) <= 120 and int(flags["retry-delay"]) == 1, call
    token_life = int(re.search(r"ttl-seconds: (\d+)", calls[0])[1])
    assert token_life > 2 * (120 + 10)  # both calls' retries, the last try's own time


@pytest.mark.parametrize("endpoint", ["http://10.0.0.5:5000", "http://[::1]:5000"])
def test_user_data_passes_an_endpoint_url_only_when_there_is_one(boot, endpoint):
    """An IPv6 one too (LOCAL_AWS_HOST=::1), which the controller had refused at start."""
    result, etc_dir, _ = boot(render(endpoint))
    assert result.returncode == 0, result.stderr
    assert f"AWS_ENDPOINT_URL={endpoint}" in (etc_dir / "worker.env").read_text().splitlines()


def test_workers_on_ec2_get_the_controllers_worker_settings(boot):
    """A setting the app tier reads, changed where the controller runs, reaches the instances;
    read back by the worker's own parser from the file systemd gives it."""
    result, etc_dir, _ = boot(render(model_runtime="tensorflow", max_image_pixels=1_000_000,
                                     shutdown_grace_s=12.5, receive_batch=4, stall_timeout_s=90,
                                     max_receive_count=5, max_upload_bytes=2_000_000))
    assert result.returncode == 0, result.stderr
    env = dict(line.split("=", 1) for line in (etc_dir / "worker.env").read_text().splitlines())
    seen = Settings.from_env(env)
    # MAX_RECEIVE_COUNT: the worker's count of a handed-back copy's attempts must be the
    # queue's redrive limit, not the default 3 on EC2 whatever is set.
    assert (seen.model_runtime, seen.max_image_pixels, seen.shutdown_grace_s, seen.receive_batch,
            seen.stall_timeout_s, seen.max_receive_count, seen.max_upload_bytes) == (
        "tensorflow", 1_000_000, 12.5, 4, 90, 5, 2_000_000)
    assert (seen.prefix, seen.region, seen.model_weights) == ("myapp", "eu-west-1", "s3://models/resnet50.h5")


@pytest.mark.parametrize("weights", ["/opt/my weights.h5", "x'; rm -rf / #", "a\nB=1"])
def test_a_value_the_boot_script_cannot_carry_is_refused_at_start(weights):
    with pytest.raises(ValueError, match="MODEL_WEIGHTS"):
        render(model_weights=weights)


def test_user_data_without_imds_starts_nothing(boot):
    result, etc_dir, calls = boot(render(), imds_fails=True)
    assert result.returncode != 0
    assert not (etc_dir / "worker.env").exists()
    assert not calls.exists()


# --- systemd unit -------------------------------------------------------------------


def unit_settings(unit: str = "imgclass-worker.service") -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (AMI / unit).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("unit", ["imgclass-worker.service", "imgclass-web.service",
                                  "imgclass-controller.service"])
def test_every_unit_asks_the_metadata_service_for_credentials_more_than_once(unit):
    """botocore's one 1 s try can miss at a busy boot."""
    environment = " ".join(unit_settings(unit)["Environment"]).split()
    assert "AWS_METADATA_SERVICE_NUM_ATTEMPTS=3" in environment
    assert "AWS_METADATA_SERVICE_TIMEOUT=2" in environment


@pytest.mark.parametrize("unit", ["imgclass-worker.service", "imgclass-web.service",
                                  "imgclass-controller.service"])
def test_every_unit_starts_at_boot_once_enabled(unit):
    """Without an [Install] section `systemctl enable` does nothing: the web tier and
    the controller would not come back after a reboot."""
    text = (AMI / unit).read_text()
    install = text[text.index("[Install]"):] if "[Install]" in text else ""
    assert "WantedBy=multi-user.target" in install, unit


@pytest.mark.parametrize("unit", ["imgclass-worker.service", "imgclass-web.service",
                                  "imgclass-controller.service"])
def test_every_unit_is_confined_alike(unit):
    """The web tier faces the internet and the controller holds the rights to launch
    instances: neither may have less confinement than the worker (systemd-analyze
    security gave 8.5 and 9.2 of 10 exposed without it)."""
    settings = unit_settings(unit)
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                   "ProtectKernelModules", "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality"):
        assert settings.get(option) == ["yes"], (unit, option)
    assert settings["ProtectSystem"] == ["strict"]


def test_the_controllers_lock_is_where_its_unit_lets_it_write():
    from common.config import state_dir

    unit = unit_settings("imgclass-controller.service")
    # systemd sets HOME from the user's entry: imgclass's home, as README step 5 makes it.
    assert Path(state_dir({"HOME": "/var/lib/imgclass"})).is_relative_to(unit["ReadWritePaths"][0])
    # Made by systemd if missing (a user made without that home): else the start fails.
    assert unit["StateDirectory"] == ["imgclass"] and unit["ReadWritePaths"] == ["/var/lib/imgclass"]


def test_systemd_unit_restarts_and_stops_gracefully():
    unit = unit_settings()
    assert unit["Restart"] == ["always"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["TimeoutStopSec"] == ["30"]
    # A worker that cannot load its weights exits with the first, and one that gave up serving
    # with the second: neither is restarted into it again.
    assert unit["RestartPreventExitStatus"] == [f"{EXIT_CANNOT_START} {EXIT_GAVE_UP}"]
    assert unit["EnvironmentFile"] == ["/etc/imgclass/worker.env"]
    assert unit["User"] == ["imgclass"]
    (exec_start,) = unit["ExecStart"]
    assert exec_start.startswith("/opt/imgclass/.venv/bin/python -m app_tier --instance-id ")
    assert "${INSTANCE_ID}" in exec_start  # written from IMDSv2 by the user-data
    # After every stop: what a worker killed before it handed back held is made visible.
    assert unit["ExecStopPost"] == [exec_start + " --show-held-only"]


def test_systemd_unit_restarts_a_worker_whose_watchdog_pings_stop():
    unit = unit_settings()
    # Started once the worker says READY=1 (common/systemd.py), after loading its model...
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["TimeoutStartSec"] == ["15min"]
    # ...then restarted (Restart=always) when its WATCHDOG=1 pings stop for this long.
    assert unit["WatchdogSec"] == ["60"]
    assert unit["LimitCORE"] == ["0"]  # the watchdog's SIGABRT: stacks in the journal, no core


def test_the_controllers_unit_restarts_a_controller_whose_watchdog_pings_stop():
    unit = unit_settings("imgclass-controller.service")
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["Restart"] == ["always"] and unit["StartLimitIntervalSec"] == ["0"]
    # Longer than a round's worst case against an AWS that stopped answering (botocore's
    # six attempts of a 30 s read): only a hang goes this long without a ping.
    assert unit["WatchdogSec"] == ["10min"] and unit["LimitCORE"] == ["0"]
    assert unit["ExecStart"] == ["/opt/imgclass/.venv/bin/python controller.py"]
    assert "AWS_ACCESS_KEY_ID" not in (AMI / "imgclass-controller.service").read_text()


def test_the_controllers_unit_does_not_restart_a_controller_refusing_its_settings():
    unit = unit_settings("imgclass-controller.service")
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "AMI_ID", "INSTANCE_PROFILE")}
    refused = subprocess.run([sys.executable, "controller.py"], cwd=AMI.parent, env=env,
                             capture_output=True, text=True, timeout=60)
    assert "INSTANCE_PROFILE is not set" in refused.stderr  # on real AWS: AWS_ENDPOINT_URL unset
    assert unit["RestartPreventExitStatus"] == [str(refused.returncode)]


def test_the_web_tiers_unit_runs_gunicorn_with_a_journal_that_outlives_it():
    unit = unit_settings("imgclass-web.service")
    assert unit["Restart"] == ["always"] and unit["StartLimitIntervalSec"] == ["0"]
    assert unit["ExecStart"] == ['/opt/imgclass/.venv/bin/python -m gunicorn -c web_tier/gunicorn.conf.py '
                                 '"web_tier:create_app()"']
    assert unit["EnvironmentFile"] == ["/etc/imgclass/web.env"] and unit["User"] == ["imgclass"]
    # The journal's default place (XDG_STATE_HOME), in a directory systemd keeps and
    # that ProtectSystem=strict leaves writable.
    assert unit["StateDirectory"] == ["imgclass-web"] and unit["ProtectSystem"] == ["strict"]
    assert "XDG_STATE_HOME=/var/lib/imgclass-web" in unit["Environment"]
    assert unit["KillSignal"] == ["SIGTERM"] and unit["TimeoutStopSec"] == ["30"]
    assert "AWS_ACCESS_KEY_ID" not in (AMI / "imgclass-web.service").read_text()


# --- IAM policy -----------------------------------------------------------------------


def test_iam_policy_is_least_privilege_on_our_buckets_and_queues():
    policy = json.loads((AMI / "iam-policy.json").read_text())
    assert policy["Version"] == "2012-10-17"
    text = json.dumps(policy)
    for name in BUCKETS + QUEUES:
        assert name in text

    buckets, queues = "|".join(BUCKETS), "|".join(QUEUES)
    ours = re.compile(rf"^arn:aws:(s3:::({buckets})/\*|sqs:[^:]+:[^:]+:({queues}))$")
    allowed_actions = set()
    for statement in policy["Statement"]:
        resources = statement["Resource"]
        actions = statement["Action"]
        if actions == ["ec2:CreateTags"]:
            # One tag each, only on this deployment's app-tier instances: a worker marks
            # its own as failed, or serving.
            assert resources == ["arn:aws:ec2:*:*:instance/*"]
            tag = {"ReportAWorkerThatGaveUp": WORKER_FAILED_TAG,
                   "ReportAWorkerThatServes": WORKER_READY_TAG}[statement["Sid"]]
            assert statement["Condition"] == {
                "StringEquals": {f"aws:ResourceTag/{ROLE_TAG}": ROLE_APP_TIER,
                                 f"aws:ResourceTag/{PREFIX_TAG}": "imgclass"},
                "ForAllValues:StringEquals": {"aws:TagKeys": [tag]},
            }
            allowed_actions.update(actions)
            continue
        if actions == ["s3:ListBucket"]:
            # Without it S3 answers a missing key with 403, not 404: the worker could
            # not tell a deleted upload (fail it) from a passing fault (retry it), nor a
            # result never stored from S3 refusing to say.
            assert resources == ["arn:aws:s3:::imgclass-in-bucket", "arn:aws:s3:::imgclass-out-bucket"]
            allowed_actions.update(actions)
            continue
        assert all(ours.match(r) for r in resources), resources
        assert not any("*" in a for a in actions), actions
        if statement["Effect"] == "Allow":
            allowed_actions.update(actions)
            assert not any(r.endswith("imgclass-req-dlq") for r in resources)
    assert allowed_actions == {
        "s3:GetObject", "s3:PutObject", "s3:GetObjectTagging", "s3:PutObjectTagging", "s3:ListBucket",
        "ec2:CreateTags",
        "sqs:GetQueueUrl", "sqs:ReceiveMessage", "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility", "sqs:SendMessage",
    }


# --- baking -------------------------------------------------------------------------


def test_provision_checks_the_weights_md5_keras_pins():
    spec = importlib.util.find_spec("keras")
    resnet = Path(spec.origin).parent / "src" / "applications" / "resnet.py"
    pinned = re.search(r'"resnet50": \(\s*"([0-9a-f]{32})"', resnet.read_text())[1]
    assert f"WEIGHTS_MD5={pinned}" in (AMI / "provision.sh").read_text()


def test_packer_template_runs_provision_with_imdsv2_only():
    template = (AMI / "worker.pkr.hcl").read_text()
    assert '"${path.root}/provision.sh"' in template
    assert re.search(r'http_tokens\s*=\s*"required"', template)
    assert re.search(r"ssh_clear_authorized_keys\s*=\s*true", template)  # no build key left in it


@pytest.mark.parametrize("tar", ["tar", pytest.param("bsdtar", marks=pytest.mark.needs_tools(
    "bsdtar", why="macOS's tar, from libarchive-tools"))])
def test_bake_packs_the_code_and_weights_and_prints_the_ami_id(tmp_path, tar):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # macOS's tar is bsdtar, which read two -C options differently from GNU tar.
    (bin_dir / "tar").symlink_to(shutil.which(tar))
    log, kept = tmp_path / "packer.log", tmp_path / "src.tar.gz"
    # A stand-in for packer: records its calls, keeps the tarball, writes the manifest.
    write_stub(bin_dir, "packer", f"""
echo "$1" >> "{log}"
for arg in "$@"; do
  case "$arg" in
    source_tarball=*) cp "${{arg#source_tarball=}}" "{kept}" ;;
    manifest_path=*) manifest="${{arg#manifest_path=}}" ;;
  esac
done
if [ "$1" = build ]; then
  echo '{{"builds": [{{"artifact_id": "eu-west-1:ami-0123456789abcdef0"}}]}}' > "$manifest"
fi
""")
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"weights")
    # bake.sh checks a --weights file's MD5 at start: this stand-in passes for the real one.
    md5 = re.search(r"^WEIGHTS_MD5=(\w+)$", (AMI / "provision.sh").read_text(), re.M)[1]
    write_stub(bin_dir, "md5sum", f'echo "{md5}  -"')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(AMI / "bake.sh"), "--region", "eu-west-1", "--weights", str(weights)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "export AMI_ID=ami-0123456789abcdef0" in result.stdout
    assert log.read_text().split() == ["init", "validate", "build"]

    with tarfile.open(kept) as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    assert {"ami/provision.sh", "ami/imgclass-worker.service", "requirements-runtime.txt", "constraints.txt",
            "app_tier/imagenet_class_index.json"} <= names
    assert ".bake/resnet50_weights_tf_dim_ordering_tf_kernels.h5" in names
    assert not any(n.startswith((".venv", ".git/", "tests")) or "__pycache__" in n for n in names)


@pytest.mark.parametrize(("extra", "want"), [
    ({}, "eu-west-3"),
    ({"AWS_PROFILE": "work"}, "ap-south-1"),
    ({"AWS_PROFILE": "nobody", "AWS_DEFAULT_PROFILE": "work"}, "ap-south-1"),
    ({"AWS_DEFAULT_REGION": "us-west-2"}, "us-west-2"),
    ({"AWS_PROFILE": "regionless"}, "us-east-1"),
])
def test_bake_bakes_in_the_region_the_controller_would_use(tmp_path, extra, want):
    """A region set by `aws configure` lives in the profile: reading only the variables,
    bake.sh would bake in us-east-1, and every launch in the profile's region fail with
    InvalidAMIID.NotFound."""
    from common.config import region_from_env

    bin_dir, log = tmp_path / "bin", tmp_path / "packer.log"
    bin_dir.mkdir()
    write_stub(bin_dir, "packer", f'echo "$@" >> "{log}"\n')
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text(
        "[default]\nregion = eu-west-3\n\n[profile work]\nregion = ap-south-1\n\n[profile regionless]\n")
    unset = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env = {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), **extra}
    result = subprocess.run(["bash", str(AMI / "bake.sh"), "--validate-only"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"region={want}" in log.read_text().split()
    assert region_from_env(env) == want


@pytest.mark.parametrize(("args", "in_tarball"), [
    ([], "false"), (["--weights-source", "none"], "false"), (["--weights", "w.h5"], "true"),
    (["--weights", "w.h5", "--weights-source", "none"], "true"),
])
def test_bake_tells_packer_whether_the_image_gets_the_weights(tmp_path, args, in_tarball):
    """The template tags the image imgclass:weights=none only when neither the tarball
    nor its weights source brings them: baked without, it works only with MODEL_WEIGHTS
    s3://... or random, and looked like any other image."""
    bin_dir, log = tmp_path / "bin", tmp_path / "packer.log"
    bin_dir.mkdir()
    write_stub(bin_dir, "packer", f'echo "$@" >> "{log}"\n')
    (tmp_path / "w.h5").write_bytes(b"weights")
    md5 = re.search(r"^WEIGHTS_MD5=(\w+)$", (AMI / "provision.sh").read_text(), re.M)[1]
    write_stub(bin_dir, "md5sum", f'echo "{md5}  -"')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(AMI / "bake.sh"), "--validate-only", *args], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"weights_in_tarball={in_tarball}" in log.read_text().split()
    template = (AMI / "worker.pkr.hcl").read_text()
    assert re.search(r'^    "imgclass:weights" = local\.weights$', template, re.M)
    assert ('weights = var.weights_in_tarball || var.weights_source != "none" ? "imagenet" : "none"'
            in template)


def test_bake_refuses_a_bad_weights_source(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stub(bin_dir, "packer", "exit 0\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(AMI / "bake.sh"), "--weights-source", "http://x"],
                            env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "--weights-source" in result.stderr


def test_the_readme_names_the_settings_workers_get_as_the_controller_gives_them():
    """Two lists in README.md copy worker_environment() by hand: this keeps them in step."""
    readme = (AMI.parent / "README.md").read_text(encoding="utf-8")
    given = set(worker_environment(Settings()))
    rendered = readme.split("`controller/act.py` renders its", 1)[1].split("into each", 1)[0]
    assert set(re.findall(r"`([A-Z_]+)`", rendered)) == given
    # The deployment's config file: all but the endpoint, which real AWS does not take.
    config = readme.split("# the workers get this file's", 1)[1].split(": set", 1)[0]
    assert set(re.findall(r"\b[A-Z][A-Z_]{3,}\b", config)) == given - {"AWS_ENDPOINT_URL"}
