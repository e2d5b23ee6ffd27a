#!/usr/bin/env bash
# Bakes the imgclass app-tier worker AMI with Packer and prints its id.
#
#   ami/bake.sh [--region R] [--weights FILE | --weights-source imagenet|s3://bucket/key|none]
#               [--build-instance-profile NAME] [--subnet-id ID] [--validate-only]
#   ami/bake.sh --pack-only FILE [--weights FILE]
#
# --pack-only writes the source tarball Packer would be given to FILE and stops there
# (no packer, no AWS): ami/smoke.sh provisions a local root from it.
#
# Needs packer (>= 1.9) and AWS credentials allowed to run Packer's amazon-ebs
# builder (see ami/README.md). Nothing here holds credentials.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
weights_name=resnet50_weights_tf_dim_ordering_tf_kernels.h5

# The region of the AWS profile in use (`aws configure` writes it there), read as
# botocore does, with Python's standard library alone: this runs on the operator's
# machine, not in the project's venv.
profile_region() {
  python3 - 2>/dev/null <<'PY' || true
import configparser, os
path = os.path.expanduser(os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config")
name = os.environ.get("AWS_DEFAULT_PROFILE") or os.environ.get("AWS_PROFILE") or "default"
config = configparser.RawConfigParser()
config.read(path)
sections = ["profile default", "default"] if name == "default" else [f"profile {name}"]
print(next((config.get(s, "region") for s in sections if config.has_option(s, "region")), ""))
PY
}

# The controller picks its region the same way (common/config.py region_from_env):
# an AMI can be launched only in the region it was baked in.
region="${AWS_REGION:-${AWS_DEFAULT_REGION:-$(profile_region)}}"
region="${region:-us-east-1}"
weights_file=""
weights_source=imagenet
build_instance_profile=""
subnet_id=""
validate_only=false
pack_only=""

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { printf 'bake.sh: %s\n' "$*" >&2; exit 1; }

while (($#)); do
  case "$1" in
    --region) region="${2:?--region needs a value}"; shift 2 ;;
    --weights) weights_file="${2:?--weights needs a file}"; shift 2 ;;
    --weights-source) weights_source="${2:?--weights-source needs a value}"; shift 2 ;;
    --build-instance-profile) build_instance_profile="${2:?}"; shift 2 ;;
    --subnet-id) subnet_id="${2:?}"; shift 2 ;;
    --validate-only) validate_only=true; shift ;;
    --pack-only) pack_only="${2:?--pack-only needs a file to write}"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

[[ -n $pack_only ]] || command -v packer >/dev/null || die "packer is not installed (https://developer.hashicorp.com/packer/install)"
case "$weights_source" in
  imagenet | none | s3://?*/?*) ;;
  *) die "--weights-source must be imagenet, none or s3://bucket/key" ;;
esac
if [[ -n $weights_file && ! -f $weights_file ]]; then
  die "no weights file at $weights_file"
fi
# Checked here, in seconds, not on the build instance minutes in, after TensorFlow's
# install (provision.sh checks again what it installs).
if [[ -n $weights_file ]]; then
  weights_md5="$(sed -n 's/^WEIGHTS_MD5=//p' "$here/provision.sh")"
  if command -v md5sum >/dev/null; then got="$(md5sum <"$weights_file" | cut -d' ' -f1)"
  else got="$(md5 -q "$weights_file")"; fi  # macOS
  [[ $got == "$weights_md5" ]] \
    || die "$weights_file is not the Keras ResNet-50 ImageNet weights file (MD5 $got, not $weights_md5)"
fi
# The build instance reads an S3 object with its instance profile: without one it has no
# credentials, and the bake would fail ~8 minutes in.
if [[ -z $weights_file && $weights_source == s3://* && -z $build_instance_profile ]]; then
  die "--weights-source $weights_source needs --build-instance-profile NAME (an instance profile that may read it), or give the file with --weights"
fi

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

# The files git tracks, as they are in this checkout (uncommitted edits included,
# a new file once it is `git add`ed), but the tests: never whatever else lies in
# the folder (a .env, credentials, the venv, `make run`'s state), which would ride
# along into every instance, readable there by any user. A weights file given
# with --weights rides along in .bake/, where provision.sh looks first.
if ! why=$(git -C "$repo" rev-parse --is-inside-work-tree 2>&1 >/dev/null); then
  why=${why%%$'\n'*}
  if [[ $why == *"dubious ownership"* ]]; then
    # Root (or anyone) in a checkout another user owns: git's safe.directory check.
    echo "bake.sh: git will not read $repo, owned by $(stat -c %U "$repo" 2>/dev/null || echo another user):" \
      "$why; run as its owner, or trust it (git config --global --add safe.directory $repo)" >&2
  else
    echo "bake.sh: $repo is not a git checkout: the image is made of the files git tracks ($why)" >&2
  fi
  exit 2
fi
# macOS's tar adds a "._name" file of extended attributes beside each file that has
# any (on macOS 13 and later, often every file of a checkout): provision.sh's compileall
# would then fail on their null bytes, minutes into the bake. GNU tar ignores this.
export COPYFILE_DISABLE=1
# (Less those deleted from the checkout and not yet `git rm`ed: tar would stop at them.)
git -C "$repo" ls-files -z -- . ':(exclude)tests' \
  | while IFS= read -r -d '' path; do
      if [[ -e $repo/$path || -L $repo/$path ]]; then printf '%s\0' "$path"; fi
    done \
  | tar -cf "$stage/imgclass-src.tar" -C "$repo" --null -T -
if [[ -n $weights_file ]]; then
  # Appended, not named with a second -C in the command above: macOS's tar applies
  # only the last -C to every name, and looked for the repository's files in .bake.
  mkdir -p "$stage/extra/.bake"
  cp "$weights_file" "$stage/extra/.bake/$weights_name"
  tar -rf "$stage/imgclass-src.tar" -C "$stage/extra" ./.bake
fi
gzip -n "$stage/imgclass-src.tar"
echo "bake.sh: source tarball is $(du -h "$stage/imgclass-src.tar.gz" | cut -f1)"
if [[ -n $pack_only ]]; then
  cp "$stage/imgclass-src.tar.gz" "$pack_only"
  echo "bake.sh: wrote $pack_only (not built: --pack-only)"
  exit 0
fi

vars=(
  -var "region=$region"
  -var "source_tarball=$stage/imgclass-src.tar.gz"
  -var "weights_source=$weights_source"
  -var "weights_in_tarball=$([[ -n $weights_file ]] && echo true || echo false)"
  -var "build_instance_profile=$build_instance_profile"
  -var "subnet_id=$subnet_id"
  -var "manifest_path=$stage/manifest.json"
)

packer init "$here/worker.pkr.hcl"
packer validate "${vars[@]}" "$here/worker.pkr.hcl"
if $validate_only; then
  echo "bake.sh: template is valid (not built: --validate-only)"
  exit 0
fi

packer build -color=false "${vars[@]}" "$here/worker.pkr.hcl"

# The manifest's artifact_id reads "<region>:<ami id>".
ami_id="$(python3 -c '
import json, sys
builds = json.load(open(sys.argv[1]))["builds"]
print(builds[-1]["artifact_id"].split(":")[-1])
' "$stage/manifest.json")"
echo
echo "bake.sh: built $ami_id in $region. Point the controller at it:"
echo "  export AMI_ID=$ami_id"
