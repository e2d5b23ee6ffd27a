"""The IAM policies in ami/ against the AWS calls each tier's code makes.

Each tier's boto3 calls are found in its source (every call named like an S3,
SQS, EC2, IAM or STS operation, and the operation of each paginator), mapped to
the IAM actions that authorise them, and checked against that tier's policy:
every action needed is allowed, on the resources it is needed on, and nothing
more. The conditions are checked against the requests the code really makes
(the controller's RunInstances, the worker's CreateTags).
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import subprocess
import threading
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import botocore.hooks
import botocore.session
import pytest
from botocore import xform_name

from common.config import Settings
from common.fleet import WORKER_READY_TAG, report_worker_failed, report_worker_ready
from controller.act import launch

ROOT = Path(__file__).resolve().parents[2]
AMI = ROOT / "ami"

# The IAM actions that authorise each boto3 operation the code calls. A batch SQS
# call is authorised by its single-message action; HeadObject by s3:GetObject;
# HeadBucket and ListObjectsV2 by s3:ListBucket. Tags given to RunInstances need
# ec2:CreateTags too, and an instance profile iam:PassRole on its role.
ACTIONS = {
    "get_object": {"s3:GetObject"},
    "head_object": {"s3:GetObject"},
    "download_file": {"s3:GetObject"},  # boto3's transfer: HeadObject, then GetObject
    "put_object": {"s3:PutObject"},
    "delete_object": {"s3:DeleteObject"},
    "get_object_tagging": {"s3:GetObjectTagging"},
    "put_object_tagging": {"s3:PutObjectTagging"},
    "list_objects_v2": {"s3:ListBucket"},
    "head_bucket": {"s3:ListBucket"},
    "create_bucket": {"s3:CreateBucket"},
    "put_public_access_block": {"s3:PutBucketPublicAccessBlock"},
    "put_bucket_encryption": {"s3:PutEncryptionConfiguration"},
    "get_bucket_lifecycle_configuration": {"s3:GetLifecycleConfiguration"},
    "put_bucket_lifecycle_configuration": {"s3:PutLifecycleConfiguration"},
    "delete_bucket_lifecycle": {"s3:PutLifecycleConfiguration"},  # S3 has no action of its own for it
    "get_queue_url": {"sqs:GetQueueUrl"},
    "get_queue_attributes": {"sqs:GetQueueAttributes"},
    "set_queue_attributes": {"sqs:SetQueueAttributes"},
    "create_queue": {"sqs:CreateQueue"},
    "receive_message": {"sqs:ReceiveMessage"},
    "delete_message_batch": {"sqs:DeleteMessage"},
    "delete_message": {"sqs:DeleteMessage"},
    "send_message_batch": {"sqs:SendMessage"},
    "change_message_visibility_batch": {"sqs:ChangeMessageVisibility"},
    "describe_instances": {"ec2:DescribeInstances"},
    "run_instances": {"ec2:RunInstances", "ec2:CreateTags", "iam:PassRole"},
    "terminate_instances": {"ec2:TerminateInstances"},
    "create_tags": {"ec2:CreateTags"},
}
# boto3's own S3 methods, which botocore's models do not list ("copy" is left out:
# every dict has one).
BOTO3_METHODS = {"download_file", "download_fileobj", "upload_file", "upload_fileobj",
                 "generate_presigned_url", "generate_presigned_post"}
# Actions that take no resource but "*".
UNSCOPED = {"ec2:DescribeInstances"}

# Tier: its policy, the files it runs, and the functions of common/ that call AWS
# on its behalf (every running tier resolves its queues through Aws.queue_url).
TIERS = {
    "worker": ("iam-policy.json", ["app_tier"],
               {"Aws.queue_url", "report_worker_failed", "report_worker_ready", "stored_outcome",
                "change_visibility", "mark_failed"}),
    "controller": ("iam-controller-policy.json", ["controller", "controller.py"],
                   {"Aws.queue_url", "Aws.queue_depth", "app_tier_instances"}),
    "web": ("iam-web-policy.json", ["web_tier"],
            {"Aws.queue_url", "Aws.queue_depth", "app_tier_instances", "stored_outcome",
             "change_visibility", "mark_failed"}),
    # Run once by a person or a deploy pipeline, never by a running tier.
    "provision": ("iam-provision-policy.json", ["common/provision.py"], set()),
}
# Allowed without a call of its own: with s3:ListBucket a missing upload answers
# GetObject with 404, not 403 (the worker fails it rather than retrying it), and a
# missing result HeadObject (the worker looks for one stored before it fails a request).
EXTRA = {"worker": {"s3:ListBucket"}}

ACCOUNT, REGION = "123456789012", "us-east-1"
INSTANCE = f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/i-0abc123def4567890"
IMAGE = f"arn:aws:ec2:{REGION}::image/ami-0123456789abcdef0"
LAUNCHED_WITH = [f"arn:aws:ec2:{REGION}:{ACCOUNT}:{kind}"
                 for kind in ("volume/vol-1", "network-interface/eni-1", "security-group/sg-1",
                              "subnet/subnet-1", "key-pair/my-key")]


def names(prefix: str) -> dict[str, str]:
    s = Settings(prefix=prefix)
    sqs = f"arn:aws:sqs:{REGION}:{ACCOUNT}:"
    return {
        "in": f"arn:aws:s3:::{s.input_bucket}", "in/*": f"arn:aws:s3:::{s.input_bucket}/b/i/cat.jpg",
        "out": f"arn:aws:s3:::{s.output_bucket}", "out/*": f"arn:aws:s3:::{s.output_bucket}/b/i/cat.jpg",
        "req": sqs + s.request_queue, "resp": sqs + s.response_queue, "dlq": sqs + s.dead_letter_queue,
        "role": f"arn:aws:iam::{ACCOUNT}:role/{prefix}-worker",
    }


def needs(tier: str, prefix: str) -> set[tuple[str, str]]:
    """(action, resource) pairs the tier needs, conditions aside."""
    n = names(prefix)
    pairs = {
        "worker": [
            *((a, n["in/*"]) for a in ("s3:GetObject", "s3:GetObjectTagging", "s3:PutObjectTagging")),
            ("s3:ListBucket", n["in"]), ("s3:ListBucket", n["out"]),
            ("s3:PutObject", n["out/*"]), ("s3:GetObject", n["out/*"]),
            *((a, n["req"]) for a in ("sqs:GetQueueUrl", "sqs:ReceiveMessage", "sqs:DeleteMessage",
                                       "sqs:ChangeMessageVisibility", "sqs:SendMessage")),
            ("sqs:GetQueueUrl", n["resp"]), ("sqs:SendMessage", n["resp"]),
            ("ec2:CreateTags", INSTANCE),
        ],
        "controller": [
            ("sqs:GetQueueUrl", n["req"]), ("sqs:GetQueueAttributes", n["req"]),
            ("ec2:DescribeInstances", "*"),
            *(("ec2:RunInstances", r) for r in (IMAGE, INSTANCE, *LAUNCHED_WITH)),
            ("ec2:CreateTags", INSTANCE), ("ec2:TerminateInstances", INSTANCE),
            ("iam:PassRole", n["role"]),
        ],
        "web": [
            *((a, n["in/*"]) for a in ("s3:PutObject", "s3:GetObject", "s3:GetObjectTagging",
                                        "s3:PutObjectTagging", "s3:DeleteObject")),
            ("s3:GetObject", n["out/*"]), ("s3:ListBucket", n["in"]), ("s3:ListBucket", n["out"]),
            *((a, n[q]) for q in ("req", "resp", "dlq")
              for a in ("sqs:GetQueueUrl", "sqs:GetQueueAttributes")),
            ("sqs:SendMessage", n["req"]),
            *((a, n[q]) for q in ("resp", "dlq") for a in ("sqs:ReceiveMessage", "sqs:DeleteMessage",
                                                            "sqs:ChangeMessageVisibility")),
            ("ec2:DescribeInstances", "*"),
        ],
        "provision": [
            *((a, n[b]) for b in ("in", "out") for a in ("s3:ListBucket", "s3:CreateBucket",
                                                          "s3:PutBucketPublicAccessBlock",
                                                          "s3:PutEncryptionConfiguration",
                                                          "s3:GetLifecycleConfiguration",
                                                          "s3:PutLifecycleConfiguration")),
            *((a, n[q]) for q in ("req", "resp", "dlq") for a in ("sqs:GetQueueUrl", "sqs:CreateQueue",
                                                                    "sqs:GetQueueAttributes",
                                                                    "sqs:SetQueueAttributes")),
        ],
    }[tier]
    return set(pairs)


def every_resource(prefix: str) -> list[str]:
    """Ours, and the like of another deployment's, which no policy may reach."""
    other = names("other")
    return [*names(prefix).values(), *other.values(), INSTANCE, IMAGE, *LAUNCHED_WITH,
            f"arn:aws:iam::{ACCOUNT}:role/admin"]


# --- reading the policies -----------------------------------------------------------

# ami/README.md's recipe for another prefix: names, the worker role, the prefix tag's value.
def load(tier: str, prefix: str = "imgclass") -> dict:
    text = (AMI / TIERS[tier][0]).read_text()
    if prefix != "imgclass":  # as ami/README.md's recipe (see the test of it below)
        text = text.replace("imgclass-", f"{prefix}-").replace('": "imgclass"', f'": "{prefix}"')
    return json.loads(text)


def as_list(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def _condition_holds(condition: dict, context: dict) -> bool:
    for operator, pairs in condition.items():
        for key, wanted in pairs.items():
            wanted, got = as_list(wanted), context.get(key)
            if operator == "ForAllValues:StringEquals":
                if got is not None and not set(got) <= set(wanted):
                    return False
            elif operator == "StringEquals":
                if got not in wanted:
                    return False
            elif operator == "StringLike":
                if got is None or not any(fnmatch.fnmatchcase(got, w) for w in wanted):
                    return False
            else:
                raise AssertionError(f"this test does not model {operator}")
    return True


def allows(policy: dict, action: str, resource: str, context: dict | None = None) -> bool:
    """IAM's verdict for one resource of a request, for the operators these policies
    use: an explicit Deny wins, else an Allow must match. Without a context,
    conditions are taken as met."""
    def applies(statement: dict) -> bool:
        return (action in as_list(statement["Action"])
                and any(fnmatch.fnmatchcase(resource, r) for r in as_list(statement["Resource"]))
                and (context is None or _condition_holds(statement.get("Condition", {}), context)))
    statements = policy["Statement"]
    if any(s["Effect"] == "Deny" and applies(s) for s in statements):
        return False
    return any(s["Effect"] == "Allow" and applies(s) for s in statements)


def allowed_actions(policy: dict) -> set[str]:
    return {a for s in policy["Statement"] if s["Effect"] == "Allow" for a in as_list(s["Action"])}


# --- reading the code ---------------------------------------------------------------


@cache
def operation_names() -> frozenset[str]:
    session = botocore.session.get_session()
    ops = {xform_name(op) for service in ("s3", "sqs", "ec2", "iam", "sts")
           for op in session.get_service_model(service).operation_names}
    return frozenset(ops | BOTO3_METHODS)


def aws_calls(tree: ast.AST) -> set[str]:
    """The AWS operations called anywhere in `tree`."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("get_paginator", "get_waiter"):
                assert node.func.attr == "get_paginator", "waiters: map their operations here"
                found.add(ast.literal_eval(node.args[0]))
            elif node.func.attr in operation_names():
                found.add(node.func.attr)
    return found


def sources(paths: list[str]) -> list[Path]:
    files = []
    for path in map(ROOT.joinpath, paths):
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


@cache
def common_functions() -> dict[str, set[str]]:
    """The AWS operations of each function (or Class.method) of common/ that calls AWS;
    common/provision.py is a tier of its own."""
    found = {}
    for path in sorted((ROOT / "common").glob("*.py")):
        if path.name == "provision.py":
            continue
        for node in ast.parse(path.read_text()).body:
            defs = [(node.name, node)] if isinstance(node, ast.FunctionDef) else []
            if isinstance(node, ast.ClassDef):
                defs = [(f"{node.name}.{f.name}", f) for f in node.body if isinstance(f, ast.FunctionDef)]
            for name, fn in defs:
                if calls := aws_calls(fn):
                    found[name] = calls
    return found


def referenced_names(files: list[Path]) -> set[str]:
    refs = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name):
                refs.add(node.id)
            elif isinstance(node, ast.Attribute):
                refs.add(node.attr)
            elif isinstance(node, ast.ImportFrom):
                refs.update(alias.name for alias in node.names)
                refs.add(node.module or "")
    return refs


def tier_calls(tier: str) -> set[str]:
    _, paths, common = TIERS[tier]
    calls = set().union(*(aws_calls(ast.parse(p.read_text())) for p in sources(paths)))
    return calls.union(*(common_functions()[name] for name in common))


# --- the tests ------------------------------------------------------------------------


def test_every_function_of_common_that_calls_aws_is_placed_in_the_tiers_that_run_it():
    claimed = set().union(*(common for _, _, common in TIERS.values()))
    assert set(common_functions()) == claimed, "place it in TIERS, and its actions in that tier's policy"
    for tier, (_, paths, common) in TIERS.items():
        refs = referenced_names(sources(paths))
        for name in common_functions():
            if name != "Aws.queue_url":  # reached through the request_queue_url properties
                assert (name.rsplit(".", 1)[-1] in refs) == (name in common), (tier, name)
        if tier != "provision":
            assert "common.provision" not in refs, f"{tier} provisions: it needs iam-provision-policy.json"


def test_every_aws_call_is_mapped_to_its_iam_actions():
    for tier in TIERS:
        unmapped = tier_calls(tier) - set(ACTIONS)
        assert not unmapped, f"{tier} calls {unmapped}: add them to ACTIONS and to {TIERS[tier][0]}"


@pytest.mark.parametrize("tier", TIERS)
def test_policy_allows_exactly_the_actions_its_tier_calls(tier):
    policy = load(tier)
    assert policy["Version"] == "2012-10-17"
    needed = set().union(*(ACTIONS[op] for op in tier_calls(tier))) | EXTRA.get(tier, set())
    assert allowed_actions(policy) == needed
    assert {a for a, _ in needs(tier, "imgclass")} == needed
    for statement in policy["Statement"]:
        assert re.fullmatch(r"[A-Z][A-Za-z]+", statement["Sid"]), statement["Sid"]
        assert not any("*" in a for a in as_list(statement["Action"])), statement["Sid"]
        if "*" in as_list(statement["Resource"]):
            assert statement["Resource"] == ["*"] and set(statement["Action"]) <= UNSCOPED, statement["Sid"]


@pytest.mark.parametrize("prefix", ["imgclass", "myapp"])
@pytest.mark.parametrize("tier", TIERS)
def test_policy_reaches_exactly_the_resources_its_tier_needs(tier, prefix):
    policy = load(tier, prefix)
    wanted = needs(tier, prefix)
    for action, resource in wanted:
        assert allows(policy, action, resource), (action, resource)
    for action in allowed_actions(policy) - UNSCOPED:
        for resource in every_resource(prefix):
            if allows(policy, action, resource):
                assert (action, resource) in wanted, f"{tier} may {action} on {resource}"


def test_the_readmes_recipe_for_another_prefix_makes_the_policies_the_tests_check(tmp_path):
    """Run as written, with PREFIX=myapp, writing to tmp_path instead of /tmp."""
    readme = (AMI / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    recipe = next(block for block in blocks if "for policy in" in block)
    script = recipe.replace("PREFIX=imgclass", "PREFIX=myapp").replace("/tmp/", f"{tmp_path}/")
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=AMI.parent, check=True, timeout=30)
    for tier, (policy_file, _, _) in TIERS.items():
        made = json.loads((tmp_path / f"myapp-{policy_file}").read_text())
        assert made == load(tier, "myapp"), tier


# IAM's quotas on a policy's size, spaces not counted: a managed policy (what the READMEs
# give a user), and all inline policies of one role together (a role's put-role-policy).
MANAGED_POLICY_CHARS, ROLE_INLINE_CHARS = 6_144, 10_240


@pytest.mark.parametrize("policy_file", sorted(p.name for p in AMI.glob("iam*.json")))
def test_each_policy_fits_where_the_readmes_put_it_for_the_longest_prefix(policy_file):
    """Too large, `create-policy` or `put-role-policy` fails with LimitExceeded. (A user's
    inline policies may hold 2,048 characters in all: the bake policy alone exceeds them,
    hence managed policies for users.) The worker's role also takes the README's statement
    for weights in S3."""
    longest = "a" * 52  # APP_PREFIX's most (common/config.py)
    text = (AMI / policy_file).read_text()
    text = text.replace("imgclass-", f"{longest}-").replace('": "imgclass"', f'": "{longest}"')
    size = len("".join(text.split()))
    assert size <= MANAGED_POLICY_CHARS, (policy_file, size)
    if policy_file == "iam-policy.json":
        weights = ('{"Sid":"ReadModelWeights","Effect":"Allow","Action":["s3:GetObject"],'
                   f'"Resource":["arn:aws:s3:::{"b" * 63}/{"k" * 200}"]}}')
        assert size + len(weights) <= ROLE_INLINE_CHARS


# --- conditions, against the requests the code makes ---------------------------------


class RecordingEc2:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        # A botocore client's events, where launch() registers its retry hook.
        self.meta = SimpleNamespace(events=botocore.hooks.HierarchicalEmitter())

    def run_instances(self, **kwargs):
        self.calls.append(("RunInstances", kwargs))
        return {"Instances": [{"InstanceId": "i-0abc123def4567890"}]}

    def create_tags(self, **kwargs):
        self.calls.append(("CreateTags", kwargs))


class StubAws:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ec2 = RecordingEc2()


def launch_request(prefix: str) -> dict:
    settings = Settings(prefix=prefix, ami_id="ami-0123456789abcdef0", key_name="my-key",
                        security_group_ids=("sg-1",), instance_profile=f"{prefix}-worker")
    aws = StubAws(settings)
    assert launch(aws, settings, (3,)) == {3: "i-0abc123def4567890"}
    [(_, request)] = aws.ec2.calls
    return request


def test_an_instance_profile_given_by_its_arn_is_launched_by_its_arn():
    """The console and the CLI show a profile's ARN: given as a Name, EC2 refuses every
    launch, and the controller would retry them for ever."""
    arn = f"arn:aws:iam::{ACCOUNT}:instance-profile/myapp-worker"
    for profile, expected in ((arn, {"Arn": arn}), ("myapp-worker", {"Name": "myapp-worker"})):
        settings = Settings(instance_profile=profile)
        aws = StubAws(settings)
        launch(aws, settings, (1,))
        [(_, request)] = aws.ec2.calls
        assert request["IamInstanceProfile"] == expected


def test_launches_are_spread_over_the_subnets_given_by_instance_number():
    """Without SUBNET_IDS a launch needs a default VPC, which many accounts and regions
    do not have: every launch would fail there."""
    settings = Settings(subnet_ids=("subnet-a", "subnet-b"))
    aws = StubAws(settings)
    launch(aws, settings, (1, 2, 3))
    subnets = {instance_tags(request)["Name"]: request["SubnetId"] for _, request in aws.ec2.calls}
    assert subnets == {"app-tier-instance-1": "subnet-b", "app-tier-instance-2": "subnet-a",
                       "app-tier-instance-3": "subnet-b"}
    aws = StubAws(Settings())
    launch(aws, aws.settings, (1,))
    assert "SubnetId" not in aws.ec2.calls[0][1]  # the default VPC's default subnet


def test_launches_ask_for_imdsv2_only_whatever_the_image_says():
    """A worker reads its instance id from the metadata service with a token
    (user-data.sh); an instance that also answered without one would hand its
    role's credentials to any request a process on it can be tricked into making."""
    options = launch_request("imgclass")["MetadataOptions"]
    assert options["HttpTokens"] == "required" and options["HttpEndpoint"] == "enabled"
    assert options["HttpPutResponseHopLimit"] == 1  # not reachable from a container on it


@pytest.mark.parametrize("prefix", ["imgclass", "myapp"])
def test_the_controllers_policy_launches_only_what_its_code_asks_for_imdsv2_only(prefix):
    """The policy holds a holder of the controller's role to what launch() does: a
    worker launched with IMDSv1 too (HttpTokens optional, or left to the image's and the
    account's defaults) is refused, whatever its tags."""
    policy, request = load("controller", prefix), launch_request(prefix)
    assert request["MetadataOptions"]["HttpTokens"] == "required"
    assert allows(policy, "ec2:RunInstances", INSTANCE, launch_context(request))
    optional = {**request, "MetadataOptions": {**request["MetadataOptions"], "HttpTokens": "optional"}}
    unset = {k: v for k, v in request.items() if k != "MetadataOptions"}
    for launched in (optional, unset):
        assert not allows(policy, "ec2:RunInstances", INSTANCE, launch_context(launched))
    # The condition is the instance's only: the image, disk and network take no such key.
    [statement] = [s for s in policy["Statement"]
                   if "ec2:MetadataHttpTokens" in s.get("Condition", {}).get("StringEquals", {})]
    assert statement["Action"] == ["ec2:RunInstances"]
    assert statement["Resource"] == ["arn:aws:ec2:*:*:instance/*"]


def instance_tags(request: dict) -> dict[str, str]:
    [spec] = [s for s in request["TagSpecifications"] if s["ResourceType"] == "instance"]
    return {t["Key"]: t["Value"] for t in spec["Tags"]}


def tag_request(tags: dict[str, str]) -> dict:
    return {**{f"aws:RequestTag/{k}": v for k, v in tags.items()}, "aws:TagKeys": list(tags)}


def launch_context(request: dict) -> dict:
    """What IAM reads of a RunInstances request for its instance: the tags it is given,
    its type, and its metadata options (absent from the request, EC2 sets no ec2:MetadataHttpTokens
    key the policy could match, and the condition fails)."""
    context = {**tag_request(instance_tags(request)), "ec2:InstanceType": request["InstanceType"]}
    if "HttpTokens" in request.get("MetadataOptions", {}):
        context["ec2:MetadataHttpTokens"] = request["MetadataOptions"]["HttpTokens"]
    return context


def tagged(tags: dict[str, str]) -> dict:
    return {f"aws:ResourceTag/{k}": v for k, v in tags.items()}


def ami_tags() -> dict[str, str]:
    """The tags worker.pkr.hcl gives the AMI it bakes."""
    block = re.search(r"^  tags = \{\n(.*?)^  \}", (AMI / "worker.pkr.hcl").read_text(), re.M | re.S)[1]
    return {k.strip('"'): v for k, v in re.findall(r'^\s*("[^"]+"|\w+)\s*=\s*"([^"$]*)"$', block, re.M)}


@pytest.mark.parametrize("prefix", ["imgclass", "myapp"])
def test_the_controller_may_launch_its_workers_from_the_baked_image_and_nothing_else(prefix):
    policy, request = load("controller", prefix), launch_request(prefix)
    tags = instance_tags(request)
    assert allows(policy, "ec2:RunInstances", INSTANCE, launch_context(request))
    assert allows(policy, "ec2:RunInstances", IMAGE, tagged(ami_tags()))
    for resource in LAUNCHED_WITH:
        assert allows(policy, "ec2:RunInstances", resource, {})
    at_launch = {"ec2:CreateAction": "RunInstances", **tag_request(tags)}
    assert allows(policy, "ec2:CreateTags", INSTANCE, at_launch)
    role = f"arn:aws:iam::{ACCOUNT}:role/{request['IamInstanceProfile']['Name']}"
    assert allows(policy, "iam:PassRole", role, {"iam:PassedToService": "ec2.amazonaws.com"})

    # Not another image, nor an instance that is not tagged as ours.
    assert not allows(policy, "ec2:RunInstances", IMAGE, {})
    assert not allows(policy, "ec2:RunInstances", IMAGE, tagged({"imgclass:role": "something-else"}))
    imdsv2 = {"ec2:MetadataHttpTokens": "required"}
    assert not allows(policy, "ec2:RunInstances", INSTANCE, {})
    assert not allows(policy, "ec2:RunInstances", INSTANCE,
                      {**tag_request({**tags, "imgclass:prefix": "other"}), **imdsv2})
    assert not allows(policy, "ec2:RunInstances", INSTANCE,
                      {**tag_request({**tags, "Owner": "me"}), **imdsv2})
    assert not allows(policy, "ec2:RunInstances", INSTANCE,
                      {**tag_request({**tags, "Name": "web-instance"}), **imdsv2})
    # Tags only as it launches; a role only for EC2, and only the worker's.
    assert not allows(policy, "ec2:CreateTags", INSTANCE, tag_request(tags))
    assert not allows(policy, "iam:PassRole", role, {"iam:PassedToService": "lambda.amazonaws.com"})
    assert not allows(policy, "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin",
                      {"iam:PassedToService": "ec2.amazonaws.com"})


@pytest.mark.parametrize("prefix", ["imgclass", "myapp"])
def test_the_controller_may_launch_burstable_x86_instances_only(prefix):
    """Whoever holds the controller's role could otherwise launch GPU instances at
    hundreds of times a t2's price; the workers need no more than a t2 (x86_64: no t4g)."""
    policy, request = load("controller", prefix), launch_request(prefix)
    assert request["InstanceType"] == Settings().instance_type == "t2.small"
    for instance_type in ("t2.small", "t2.medium", "t3.large", "t3a.xlarge"):
        launched = launch_context({**request, "InstanceType": instance_type})
        assert allows(policy, "ec2:RunInstances", INSTANCE, launched), instance_type
    for instance_type in ("p4d.24xlarge", "c7i.48xlarge", "t4g.small", "x2.t2.small", ""):
        launched = launch_context({**request, "InstanceType": instance_type})
        assert not allows(policy, "ec2:RunInstances", INSTANCE, launched), instance_type
    without = launch_context(request)
    del without["ec2:InstanceType"]
    assert not allows(policy, "ec2:RunInstances", INSTANCE, without)


@pytest.mark.parametrize("prefix", ["imgclass", "myapp"])
def test_the_controller_may_terminate_only_instances_it_launched(prefix):
    policy = load("controller", prefix)
    tags = instance_tags(launch_request(prefix))
    assert allows(policy, "ec2:TerminateInstances", INSTANCE, tagged(tags))
    assert not allows(policy, "ec2:TerminateInstances", INSTANCE, tagged({"Name": tags["Name"]}))
    assert not allows(policy, "ec2:TerminateInstances", INSTANCE,
                      tagged({**tags, "imgclass:prefix": "other"}))
    assert not allows(policy, "ec2:TerminateInstances", INSTANCE, {})


@pytest.mark.parametrize("prefix", ["imgclass", "myapp"])
def test_a_worker_may_put_its_two_tags_on_its_own_deployments_app_tier_instances_only(prefix):
    """Not another deployment's (another APP_PREFIX) in the same account."""
    policy, settings = load("worker", prefix), Settings(prefix=prefix)
    aws = StubAws(settings)
    report_worker_failed(aws, "i-0abc123def4567890", "model-unavailable")
    report_worker_ready(aws, "i-0abc123def4567890", threading.Event())
    ours = tagged(instance_tags(launch_request(settings.prefix)))
    assert [name for name, _ in aws.ec2.calls] == ["CreateTags", "CreateTags"]
    for _, request in aws.ec2.calls:
        tags = {t["Key"]: t["Value"] for t in request["Tags"]}
        assert allows(policy, "ec2:CreateTags", INSTANCE, {**ours, **tag_request(tags)})
        assert not allows(policy, "ec2:CreateTags", INSTANCE, tag_request(tags))
    assert not allows(policy, "ec2:CreateTags", INSTANCE, {**ours, **tag_request({"imgclass:role": "web"})})
    theirs = {**ours, **tagged({"imgclass:prefix": "other"})}
    assert not allows(policy, "ec2:CreateTags", INSTANCE, {**theirs, **tag_request({WORKER_READY_TAG: "1"})})


# --- the baker's policy, against the build worker.pkr.hcl asks Packer for ----------

BAKER = "imgclass-baker"  # ami/README.md's --build-instance-profile, and its role
BUILD_GROUP = f"arn:aws:ec2:{REGION}:{ACCOUNT}:security-group/sg-0packer"
SNAPSHOT = f"arn:aws:ec2:{REGION}:{ACCOUNT}:snapshot/snap-0123456789abcdef0"


def run_tags() -> dict[str, str]:
    """The tags worker.pkr.hcl gives the build's instance, key pair and group, and (the
    plugin since hashicorp/packer-plugin-amazon#327, unless skip_ami_run_tags) the image
    and its snapshot as CreateImage makes them."""
    template = (AMI / "worker.pkr.hcl").read_text()
    return {"Name": re.search(r'run_tags = \{\s*Name = "([^"]+)"\s*\}', template)[1]}


def ami_tag_keys() -> list[str]:
    """The keys of the tags worker.pkr.hcl puts on the image and its snapshot once made."""
    block = re.search(r"^  tags = \{\n(.*?)^  \}", (AMI / "worker.pkr.hcl").read_text(), re.M | re.S)[1]
    return [k.strip('"') for k in re.findall(r'^\s*("[^"]+"|\w+)\s*=', block, re.M)]


def test_the_bakers_policy_allows_what_packers_build_of_the_template_calls():
    """The EC2 calls Packer's amazon-ebs builder makes for what the template asks (a
    source AMI found by filter, a temporary key pair and security group since it names
    neither, a subnet, an instance profile for the weights), each allowed."""
    template = (AMI / "worker.pkr.hcl").read_text()
    policy = json.loads((AMI / "iam-bake-policy.json").read_text())
    needed = {"ec2:RunInstances", "ec2:DescribeInstances", "ec2:DescribeInstanceStatus",
              "ec2:StopInstances", "ec2:CreateImage", "ec2:DescribeImages", "ec2:TerminateInstances"}
    if "source_ami_filter" in template:
        needed |= {"ec2:DescribeImages"}
    key_pair_needs = set()
    if "ssh_keypair_name" not in template:
        needed |= {"ec2:CreateKeyPair"}
        key_pair_needs = {"ec2:DeleteKeyPair"}
    group_needs = set()
    if "security_group_id" not in template:
        needed |= {"ec2:CreateSecurityGroup", "ec2:DescribeSecurityGroups"}
        group_needs = {"ec2:AuthorizeSecurityGroupIngress", "ec2:DeleteSecurityGroup"}
    if "subnet_id" in template:
        needed |= {"ec2:DescribeSubnets", "ec2:DescribeVpcs"}
    builder = tagged({"Name": re.search(r'run_tags = \{\s*Name = "([^"]+)"', template)[1]})
    for action in needed:
        assert allows(policy, action, INSTANCE, builder), action
    for action in group_needs:  # the temporary group, tagged as the instance is
        assert allows(policy, action, BUILD_GROUP, builder), action
    for action in key_pair_needs:  # and the temporary key pair
        assert allows(policy, action, f"arn:aws:ec2:{REGION}:{ACCOUNT}:key-pair/packer_1", builder), action
    # The run tags go with the launch, and with the temporary key pair and group (the
    # plugin tags them as it makes them); the AMI's tags (and its snapshot's) after it is made.
    assert allows(policy, "ec2:CreateTags", INSTANCE, {"ec2:CreateAction": "RunInstances"})
    # The plugin (hashicorp/packer-plugin-amazon#326, before 1.3.0) tags the launch's
    # network interface with them too: EC2 checks CreateTags on each kind it tags.
    assert allows(policy, "ec2:CreateTags", f"arn:aws:ec2:{REGION}:{ACCOUNT}:network-interface/eni-1",
                  {"ec2:CreateAction": "RunInstances"})
    assert allows(policy, "ec2:CreateTags", f"arn:aws:ec2:{REGION}:{ACCOUNT}:key-pair/packer_1",
                  {"ec2:CreateAction": "CreateKeyPair"})
    assert allows(policy, "ec2:CreateTags", BUILD_GROUP, {"ec2:CreateAction": "CreateSecurityGroup"})
    # The image: made from the build instance (above), its run tags given to the image and
    # its snapshot as CreateImage makes them; then its description and IMDS support set
    # (ModifyImageAttribute, before the tags), then tagged as the template says.
    at_creation = {"ec2:CreateAction": "CreateImage", **tag_request(run_tags())}
    for made in (IMAGE, SNAPSHOT):
        assert allows(policy, "ec2:CreateImage", made, tag_request(run_tags())), made
        assert allows(policy, "ec2:CreateTags", made, at_creation), made
    assert "ami_description" in template and "imds_support" in template
    assert allows(policy, "ec2:ModifyImageAttribute", IMAGE, tagged(run_tags()))
    assert set(ami_tag_keys()) == {"Name", "imgclass:role", "imgclass:weights", "SourceAMI"}
    ami_tagging = {**tagged(run_tags()), **tag_request(dict.fromkeys(ami_tag_keys(), "v"))}
    for made in (IMAGE, SNAPSHOT):
        assert allows(policy, "ec2:CreateTags", made, ami_tagging), made
    assert "iam_instance_profile" in template
    assert allows(policy, "iam:GetInstanceProfile", f"arn:aws:iam::{ACCOUNT}:instance-profile/{BAKER}")
    assert allows(policy, "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/{BAKER}",
                  {"iam:PassedToService": "ec2.amazonaws.com"})


def test_the_baker_may_end_only_its_build_instance_and_pass_only_its_own_role():
    policy = json.loads((AMI / "iam-bake-policy.json").read_text())
    # Nor tag another instance, or group, as the build's, to end or open it so.
    assert not allows(policy, "ec2:CreateTags", INSTANCE, {})
    assert not allows(policy, "ec2:CreateTags", INSTANCE, {"ec2:CreateAction": "CreateImage"})
    assert not allows(policy, "ec2:CreateTags", BUILD_GROUP, {})
    for action in ("ec2:AuthorizeSecurityGroupIngress", "ec2:DeleteSecurityGroup"):  # the web tier's, say
        assert not allows(policy, action, BUILD_GROUP, tagged({"Name": "web-instance"})), action
    assert not allows(policy, "ec2:ModifyInstanceAttribute", INSTANCE, tagged({"Name": "web-instance"}))
    key_pair = f"arn:aws:ec2:{REGION}:{ACCOUNT}:key-pair/my-key"
    assert not allows(policy, "ec2:DeleteKeyPair", key_pair, {})
    assert allows(policy, "ec2:DeleteKeyPair", key_pair, tagged({"Name": "imgclass-ami-builder"}))
    for action in ("ec2:StopInstances", "ec2:TerminateInstances"):
        assert not allows(policy, action, INSTANCE, tagged({"Name": "web-instance"})), action
        assert not allows(policy, action, INSTANCE, {}), action
    role = f"arn:aws:iam::{ACCOUNT}:role/{BAKER}"
    assert not allows(policy, "iam:PassRole", role, {"iam:PassedToService": "lambda.amazonaws.com"})
    for other in ("admin", "imgclass-worker"):
        assert not allows(policy, "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/{other}",
                          {"iam:PassedToService": "ec2.amazonaws.com"})
    # Nothing of S3, SQS or IAM beyond those two: the weights are read by the build
    # instance's own role, not by whoever bakes.
    assert {a.split(":")[0] for a in allowed_actions(policy)} == {"ec2", "iam"}
    assert {a for a in allowed_actions(policy) if a.startswith("iam:")} == {"iam:GetInstanceProfile",
                                                                            "iam:PassRole"}


def test_the_baker_may_tag_as_the_worker_image_or_change_only_an_image_its_build_made():
    """The controller launches only an image tagged imgclass:role=app-tier-ami: the
    baker may put that tag only on the image (and its snapshot) that CreateImage made
    of the build instance, which carries the build's run tag from its making, never on
    another image of the account, a shared or a public one; nor share or change another
    image, nor share any snapshot."""
    policy = json.loads((AMI / "iam-bake-policy.json").read_text())
    worker_image = tag_request({"imgclass:role": "app-tier-ami"})
    for other in (IMAGE, SNAPSHOT):
        assert not allows(policy, "ec2:CreateTags", other, worker_image), other
        assert not allows(policy, "ec2:CreateTags", other,
                          {**tagged({"Name": "web-instance"}), **worker_image}), other
        # Tagged as the build's only as CreateImage makes it, and only with that tag.
        assert not allows(policy, "ec2:CreateTags", other, {**tag_request(run_tags())}), other
        assert not allows(policy, "ec2:CreateTags", other,
                          {"ec2:CreateAction": "CreateImage", **worker_image}), other
        assert not allows(policy, "ec2:CreateTags", other,
                          {"ec2:CreateAction": "CreateImage",
                           **tag_request({**run_tags(), "imgclass:role": "app-tier-ami"})}), other
        # The build's own image: the template's tags, no others.
        assert not allows(policy, "ec2:CreateTags", other,
                          {**tagged(run_tags()), **tag_request({"Owner": "me"})}), other
    # An image is made only of the build instance (else any instance's, web's included,
    # could be made an image tagged as the build's).
    assert not allows(policy, "ec2:CreateImage", INSTANCE, {})
    assert not allows(policy, "ec2:CreateImage", INSTANCE, tagged({"Name": "web-instance"}))
    # Described, given IMDS support (or shared) only while it is the build's.
    assert not allows(policy, "ec2:ModifyImageAttribute", IMAGE, {})
    assert not allows(policy, "ec2:ModifyImageAttribute", IMAGE, tagged({"imgclass:role": "app-tier-ami"}))
    # What this template never asks of Packer (snapshot_users or snapshot_groups would share
    # the snapshot; chroot and ebsvolume builds make and attach volumes): not granted.
    # Nor copy an image (ami_regions, encrypt_boot), detach a volume (chroot and
    # ebssurrogate builds), or read a Windows password (winrm).
    template = (AMI / "worker.pkr.hcl").read_text()
    for option in ("snapshot_users", "snapshot_groups", "skip_ami_run_tags", "amazon-chroot",
                   "amazon-ebsvolume", "amazon-ebssurrogate", "ami_regions", "encrypt_boot", "winrm"):
        assert option not in template, option
    never = {"ec2:ModifySnapshotAttribute", "ec2:CreateVolume", "ec2:AttachVolume", "ec2:CopyImage",
             "ec2:DetachVolume", "ec2:GetPasswordData"}
    assert not never & allowed_actions(policy)
    # A failed build's cleanup deregisters its image and deletes its snapshot, tagged as
    # the build's or, once tagged so, as the worker image: never another of the account.
    for made in (IMAGE, SNAPSHOT):
        action = "ec2:DeregisterImage" if made == IMAGE else "ec2:DeleteSnapshot"
        assert allows(policy, action, made, tagged(run_tags())), made
        worker_image = tagged({"Name": "imgclass-worker-1", "imgclass:role": "app-tier-ami"})
        assert allows(policy, action, made, worker_image), made
        assert not allows(policy, action, made, {}), made
        assert not allows(policy, action, made, tagged({"Name": "backup-2026-12-01"})), made
    # The run tags on the image come with the plugin of 1.3.0 on (#327, early 2023); a
    # later major version may make calls the policy does not allow.
    assert re.search(r'amazon = \{\s*(#[^\n]*\n\s*)*version = "~> 1\.3"', template)
