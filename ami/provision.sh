#!/usr/bin/env bash
# Turns a stock Amazon Linux 2023 or Ubuntu 22.04 build instance into an imgclass
# worker image. Packer (ami/worker.pkr.hcl) uploads the source tarball made by
# ami/bake.sh and runs this once, as root. See ami/README.md.
#
# Environment:
#   SRC_TARBALL     the repository as a .tar.gz   (default /tmp/imgclass-src.tar.gz)
#   WEIGHTS_SOURCE  where the ResNet-50 ImageNet weights come from, when bake.sh did
#                   not put the file in the tarball:
#                     imagenet        Keras downloads them (needs the internet)
#                     s3://bucket/key copied from S3 with the build instance's role
#                     none            bake without them (then MODEL_WEIGHTS=s3://... or
#                                     random must be set at launch)
set -euo pipefail

SRC_TARBALL="${SRC_TARBALL:-/tmp/imgclass-src.tar.gz}"
WEIGHTS_SOURCE="${WEIGHTS_SOURCE:-imagenet}"

APP_DIR=/opt/imgclass
VENV="$APP_DIR/.venv"
SERVICE_USER=imgclass
SERVICE_HOME=/var/lib/imgclass
KERAS_MODELS="$SERVICE_HOME/.keras/models"
WEIGHTS_FILE=resnet50_weights_tf_dim_ordering_tf_kernels.h5
# The MD5 Keras pins for that file (keras/src/applications/resnet.py). Keras checks
# it too: a different file would make it try to download again at every boot.
WEIGHTS_MD5=2cb95161c43110f7111970584f804107

log() { printf '==> provision: %s\n' "$*"; }
die() { printf 'provision: %s\n' "$*" >&2; exit 1; }

# Runs a command as the service user, with its home, from the code directory.
as_service() {
  runuser -u "$SERVICE_USER" -- env HOME="$SERVICE_HOME" PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 bash -c 'cd "$0" && exec "$@"' "$APP_DIR" "$@"
}

install_packages() {
  log "installing Python 3.11"
  # cloud-init may still run its first boot's stages as Packer connects (at sshd's
  # start): they hold the package manager's lock (Ubuntu's unattended-upgrades too), and
  # clean_up's `cloud-init clean` must not run under them. Bounded: where cloud-init is
  # installed but never runs (a container), it waits for ever.
  if command -v cloud-init >/dev/null; then timeout 600 cloud-init status --wait >/dev/null || true; fi
  if command -v dnf >/dev/null; then
    dnf install -y -q python3.11 python3.11-pip tar gzip
    dnf clean all
  elif command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
      python3.11 python3.11-venv ca-certificates curl
    apt-get clean
    rm -rf /var/lib/apt/lists/*
  else
    die "neither dnf nor apt-get found: use Amazon Linux 2023 or Ubuntu 22.04"
  fi
}

create_user() {
  if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    log "creating system user $SERVICE_USER"
    useradd --system --home-dir "$SERVICE_HOME" --create-home --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
  install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" \
    "$SERVICE_HOME" "$SERVICE_HOME/.keras" "$KERAS_MODELS"
}

install_code() {
  [[ -f $SRC_TARBALL ]] || die "no source tarball at $SRC_TARBALL (ami/bake.sh makes it)"
  log "installing the code in $APP_DIR"
  rm -rf "$APP_DIR"
  install -d -m 0755 "$APP_DIR"
  tar -xzf "$SRC_TARBALL" -C "$APP_DIR" --no-same-owner
  # A tarball made by macOS's tar without COPYFILE_DISABLE=1 (by hand, not bake.sh)
  # holds a "._name" of extended attributes beside each file: compileall fails on them.
  find "$APP_DIR" -type f -name '._*' -delete
  # Root owns the code: a compromised worker cannot change what it runs.
  chown -R root:root "$APP_DIR"
  chmod -R u+rwX,go+rX,go-w "$APP_DIR"

  log "creating the virtualenv and installing requirements-runtime.txt"
  # pip downloads each wheel into TMPDIR before installing it, --no-cache-dir or
  # not: hundreds of MB for TensorFlow and OpenVINO. Amazon Linux 2023's /tmp is a
  # tmpfs capped at half the RAM, so on a smaller build instance they would run
  # out of room there, and take memory: /var/tmp is on disk.
  export TMPDIR=/var/tmp
  python3.11 -m venv "$VENV"
  "$VENV/bin/pip" install --no-cache-dir --quiet --upgrade pip
  "$VENV/bin/pip" install --no-cache-dir --quiet -r "$APP_DIR/requirements-runtime.txt" -c "$APP_DIR/constraints.txt"
  # The service user cannot write bytecode next to the code, so compile it now.
  "$VENV/bin/python" -m compileall -q "$APP_DIR/app_tier" "$APP_DIR/common"
}

install_weights() {
  local staged="$APP_DIR/.bake/$WEIGHTS_FILE" target="$KERAS_MODELS/$WEIGHTS_FILE"
  if [[ -f $staged ]]; then
    log "installing the weights file uploaded by bake.sh"
    install -m 0640 -o "$SERVICE_USER" -g "$SERVICE_USER" "$staged" "$target"
  elif [[ $WEIGHTS_SOURCE == s3://* ]]; then
    log "copying the weights from $WEIGHTS_SOURCE"
    as_service "$VENV/bin/python" -c '
import sys, boto3
bucket, _, key = sys.argv[1][len("s3://"):].partition("/")
boto3.client("s3").download_file(bucket, key, sys.argv[2])
' "$WEIGHTS_SOURCE" "$target"
  elif [[ $WEIGHTS_SOURCE == imagenet ]]; then
    log "downloading the weights with Keras"
    as_service "$VENV/bin/python" -c \
      'import keras; keras.applications.ResNet50(weights="imagenet")'
  elif [[ $WEIGHTS_SOURCE == none ]]; then
    log "WARNING: baking without weights; launch with MODEL_WEIGHTS=s3://... or random"
  else
    die "WEIGHTS_SOURCE must be imagenet, s3://bucket/key or none, not '$WEIGHTS_SOURCE'"
  fi
  rm -rf "$APP_DIR/.bake"

  # The label list ships with the code and is byte-identical to Keras's own, so
  # keras' decode_predictions finds it in the cache too and never downloads it.
  install -m 0640 -o "$SERVICE_USER" -g "$SERVICE_USER" \
    "$APP_DIR/app_tier/imagenet_class_index.json" "$KERAS_MODELS/imagenet_class_index.json"

  if [[ -f $target ]]; then
    echo "$WEIGHTS_MD5  $target" | md5sum --check --quiet - \
      || die "$target is not the Keras ResNet-50 ImageNet weights file (MD5 differs)"
  fi
}

warm_up() {
  # Loading the model once proves the image works (weights load, one prediction
  # runs) and, for the default OpenVINO runtime, converts the Keras network to IR
  # and caches it in the service user's home, so that a booted instance answers
  # its first image about a second after the worker starts.
  local weights=imagenet
  [[ -f $KERAS_MODELS/$WEIGHTS_FILE ]] || weights=random
  log "preparing the model once ($weights weights)"
  as_service env MODEL_WEIGHTS="$weights" "$VENV/bin/python" -m app_tier --prepare-only
}

install_service() {
  log "installing the systemd unit"
  install -d -m 0755 /etc/imgclass
  install -m 0644 "$APP_DIR/ami/imgclass-worker.service" /etc/systemd/system/imgclass-worker.service
  systemctl daemon-reload
  # Not enabled here: the user-data enables it once it has written worker.env.
}

clean_up() {
  rm -f "$SRC_TARBALL" /etc/imgclass/worker.env
  # Each instance made from this image must run its own user-data at first boot.
  if command -v cloud-init >/dev/null; then
    cloud-init clean --logs
  fi
  # Nor share this build instance's machine-id (journald, DHCP client ids and
  # others key on it). machine-id(5): an image for many machines holds an empty
  # file, and systemd writes a new id into it at each instance's first boot.
  # Empty rather than "uninitialized", which would also make that a first boot
  # (ConditionFirstBoot: unit presets applied again over the baked units). systemd
  # falls back to dbus's copy (unless a symlink) before making a new id.
  truncate -s 0 /etc/machine-id
  if [[ -f /var/lib/dbus/machine-id && ! -L /var/lib/dbus/machine-id ]]; then
    rm -f /var/lib/dbus/machine-id
  fi
}

[[ $EUID -eq 0 ]] || die "run as root (Packer runs it with sudo)"
install_packages
create_user
install_code
install_weights
warm_up
install_service
clean_up
log "done"
