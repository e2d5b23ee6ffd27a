#!/bin/bash
# imgclass app-tier boot script (see ami/README.md).
# The controller replaces the {{...}} placeholders (controller/act.py) and sends the
# result as EC2 user-data; cloud-init runs it once, as root, at the first boot.
# Keep it short: EC2 refuses user-data over 16 KB.
set -euo pipefail

# Only tests point this elsewhere.
etc_dir="${IMGCLASS_ETC_DIR:-/etc/imgclass}"
imds=http://169.254.169.254/latest

# IMDSv2: a token, then the instance id the worker reports itself as. Calls bounded,
# retried on any error for 2 min; the token outlives them (an expired one's 401 ends this).
imds_curl=(curl -fsS --connect-timeout 2 --max-time 10 --retry 10 --retry-delay 1
  --retry-max-time 120 --retry-all-errors)
token=$("${imds_curl[@]}" -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 21600" "$imds/api/token")
instance_id=$("${imds_curl[@]}" -H "X-aws-ec2-metadata-token: $token" "$imds/meta-data/instance-id")

# Single quotes: whatever the controller renders is taken literally.
endpoint='{{AWS_ENDPOINT_URL}}'

# systemd reads the file as root; nothing in it is secret, but nobody else needs it.
umask 077
mkdir -p "$etc_dir"
{
  echo 'AWS_REGION={{AWS_REGION}}'
  echo 'AWS_DEFAULT_REGION={{AWS_REGION}}'
  echo 'APP_PREFIX={{APP_PREFIX}}'
  echo 'MODEL_WEIGHTS={{MODEL_WEIGHTS}}'
  echo 'MODEL_RUNTIME={{MODEL_RUNTIME}}'
  echo 'WORKER_THREADS={{WORKER_THREADS}}'
  echo 'WORKER_ONE_IMAGE_THREADS={{WORKER_ONE_IMAGE_THREADS}}'
  echo 'RECEIVE_BATCH={{RECEIVE_BATCH}}'
  echo 'RECEIVE_WAIT={{RECEIVE_WAIT}}'
  echo 'VISIBILITY_TIMEOUT={{VISIBILITY_TIMEOUT}}'
  echo 'RETRY_DELAY={{RETRY_DELAY}}'
  echo 'SHUTDOWN_GRACE={{SHUTDOWN_GRACE}}'
  echo 'STALL_TIMEOUT={{STALL_TIMEOUT}}'
  echo 'MAX_RECEIVE_COUNT={{MAX_RECEIVE_COUNT}}'
  echo 'MAX_IMAGE_PIXELS={{MAX_IMAGE_PIXELS}}'
  echo 'MAX_UPLOAD_BYTES={{MAX_UPLOAD_BYTES}}'
  echo "INSTANCE_ID=$instance_id"
  # An empty AWS_ENDPOINT_URL is not the same as none to every AWS SDK: omit it.
  if [ -n "$endpoint" ]; then echo "AWS_ENDPOINT_URL=$endpoint"; fi
} > "$etc_dir/worker.env.new"
mv "$etc_dir/worker.env.new" "$etc_dir/worker.env"

# --no-block: the unit is Type=notify, so a blocking start would hold cloud-init until
# the model is loaded, and fail this script if it cannot be; the unit's own restart
# policy deals with that.
systemctl enable --now --no-block imgclass-worker.service
