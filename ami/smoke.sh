#!/usr/bin/env bash
# Smoke test of the worker image, for real, without AWS (see ami/README.md, Smoke test).
#
#   ami/smoke.sh [--clean] [--reuse-image] [--deadline SECONDS]
#
# Bakes a local image as bake.sh and Packer would: a Debian bookworm root, booted with
# systemd in a container, gets bake.sh's source tarball and runs ami/provision.sh as
# root. Then boots that image as an instance would, runs the controller's rendered
# user-data against a stand-in IMDSv2, and checks that the unit's worker answers one
# request through the embedded AWS (moto, on loopback) and stops cleanly on SIGTERM.
#
#   --clean        remove the cached roots when done (kept by default, for a quicker next run)
#   --reuse-image  skip the bake: boot the image the last run provisioned
#   --deadline S   how long the worker may take to answer once started (default 600)
#
# Linux only, as root (debootstrap, systemd-nspawn; installs both with apt-get if
# missing). Cache: $IMGCLASS_SMOKE_CACHE, default /var/cache/imgclass-ami-smoke: a directory
# root owns and alone may write (refused otherwise).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${IMGCLASS_SMOKE_CACHE:-/var/cache/imgclass-ami-smoke}"
python="${SMOKE_PYTHON:-$repo/.venv/bin/python}"
suite=bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
clean=false
reuse_image=false
deadline=600

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { printf 'smoke.sh: %s\n' "$*" >&2; exit 2; }
say() { printf '==> smoke: %s\n' "$*"; }

while (($#)); do
  case "$1" in
    --clean) clean=true; shift ;;
    --reuse-image) reuse_image=true; shift ;;
    --deadline)
      deadline="${2:?--deadline needs seconds}"; shift 2
      [[ $deadline =~ ^[1-9][0-9]*$ ]] || die "--deadline takes whole seconds, not '$deadline'"
      ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

[[ $(uname -s) == Linux ]] || die "needs Linux (debootstrap, systemd-nspawn)"

# Root writes the lock and the logs in the cache, and boots the roots it holds: a
# directory that anyone else could write, or replace (a symlink, or a folder in one that
# is not root's alone), would let them plant what root runs. Checked before anything
# else, and again once the directory is made.
unsafe_dir() {  # unsafe_dir DIR: why DIR may be written or replaced by others than root, or nothing
  local dir="$1" uid mode user
  read -r uid mode user < <(stat -c '%u %a %U' -- "$dir")
  if ((8#$mode & 8#022)) && ! ((8#$mode & 8#1000)); then
    echo "is writable by group or others (mode $mode)"
  elif ((uid != 0)); then
    echo "is owned by $user (uid $uid), not root"
  fi
}
check_cache() {
  local fix="use a directory root owns and alone may write (the default: unset IMGCLASS_SMOKE_CACHE)"
  local why dir uid mode user
  [[ $cache == /* ]] || die "the cache '$cache' is not an absolute path: refusing it; $fix"
  # findmnt -r writes such characters escaped (\x20): mounted_under could not match them.
  [[ ! $cache =~ [[:space:]\\] ]] || die "the cache '$cache' has a space or a backslash in it: refusing it"
  if [[ -L $cache ]]; then
    die "the cache $cache is a symlink: refusing it; $fix"
  elif [[ -e $cache ]]; then
    [[ -d $cache ]] || die "the cache $cache is not a directory: refusing it; $fix"
    read -r uid mode user < <(stat -c '%u %a %U' -- "$cache")
    ((8#$mode & 8#022)) && die "the cache $cache is writable by group or others (mode $mode): refusing it; $fix"
    ((uid == 0)) || die "the cache $cache is owned by $user (uid $uid), not root: refusing it; $fix"
  fi
  # Every folder above it, as written and as it resolves: whoever may write one of them
  # could swap the cache for their own (a sticky one, as /tmp, lets nobody move root's).
  for dir in "$(dirname "$cache")" "$(realpath -m "$(dirname "$cache")")"; do
    while :; do
      if [[ -d $dir && ! -L $dir ]]; then
        why=$(unsafe_dir "$dir")
        [[ -z $why ]] || die "$dir, above the cache $cache, $why: refusing it; $fix"
      fi
      [[ $dir == / ]] && break
      dir=$(dirname "$dir")
    done
  done
}
check_cache
[[ $EUID -eq 0 ]] || die "run as root: debootstrap and systemd-nspawn need it (sudo make ami-smoke)"
# Before any Python runs here as root: no root-owned __pycache__ left in the checkout.
export PYTHONDONTWRITEBYTECODE=1
[[ -x $python ]] || die "no Python at $python: run make venv first (as yourself, not root), or set SMOKE_PYTHON"
# Root in a checkout its developer owns: git's safe.directory check would refuse it
# ("dubious ownership"). Trusted for this run's git calls (here and bake.sh's, which
# only read): root runs this checkout's own code anyway, its Python and its scripts.
n=${GIT_CONFIG_COUNT:-0}
export "GIT_CONFIG_KEY_$n=safe.directory" "GIT_CONFIG_VALUE_$n=$repo" GIT_CONFIG_COUNT=$((n + 1))
if ! why=$(git -C "$repo" rev-parse --is-inside-work-tree 2>&1 >/dev/null); then
  die "git does not take $repo for a checkout (${why%%$'\n'*}): bake.sh packs the files git tracks"
fi

base="$cache/base"          # debootstrap's root, never booted: the stock build instance
image="$cache/image"        # a copy of it, provisioned: the AMI
run="$cache/run"            # this run's logs and state
build_machine=imgclass-smoke-build
instance_machine=imgclass-smoke-instance
s3_machine=imgclass-smoke-instance-s3
in_path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

nspawn_pid=""
moto_pid=""
imds_pid=""
results=()
failed=0
summarised=false
t_all=""
prepare_s="cached"
provision_s="skipped (--reuse-image)"
first_ready_s=""
answer_s=""
restart_s=""
burst_s=""
stop_s=""
s3_ready_s=""
s3_answer_s=""
poweroff_s=""

pass() { results+=("PASS  $*"); say "PASS: $*"; }
fail() { results+=("FAIL  $*"); say "FAIL: $*"; failed=1; }
check() {  # check DESCRIPTION COMMAND...
  local what="$1"; shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Nothing is mounted on the host: systemd-nspawn mounts /proc, /sys, /dev and /tmp
# in the container's own mount namespace, which ends with it. Still, nothing under
# the cache is removed while anything the host sees is mounted there. (What guards a
# root another run has booted is the lock: its mounts are not seen here.)
mounted_under() {  # mounted_under DIR: DIR, or a path under it, is a mount point
  local targets
  # Not a pipe into grep -q, whose early exit could end findmnt with SIGPIPE (status 141
  # under pipefail: "not mounted"). And findmnt failing counts as mounted.
  targets=$(findmnt -rn -o TARGET) || return 0
  DIR="$1" awk 'BEGIN { d = ENVIRON["DIR"] } $0 == d || index($0, d "/") == 1 { found = 1 }
    END { exit !found }' <<<"$targets"
}

remove_root() {
  local dir="$1"
  [[ -e $dir ]] || return 0
  if mounted_under "$dir"; then
    say "NOT removing $dir: something is mounted under it (findmnt)"; return 1
  fi
  rm -rf --one-file-system "$dir"
}

container_leader() {  # the container's PID 1: systemd, a child of systemd-nspawn, in a PID namespace of its own
  # Not any child: while it sets up, nspawn's own helpers are its children too, in the
  # host's namespaces, and nsenter into one of those would run the command on the host.
  local pid ns host_ns
  host_ns=$(readlink /proc/self/ns/pid)
  for pid in $(pgrep -P "$nspawn_pid" -x systemd); do
    ns=$(readlink "/proc/$pid/ns/pid" 2>/dev/null) || continue
    if [[ $ns != "$host_ns" ]]; then echo "$pid"; return 0; fi
  done
}

# Runs a command in the booted container as root, as a login over SSH would: its
# namespaces and root, a clean environment. (Without machined on the host, nspawn
# runs with --register=no, so machinectl and systemd-run -M cannot reach it.)
in_container() {
  nsenter -t "$(container_leader)" -m -u -i -n -p -r -w -- \
    env -i PATH="$in_path" HOME=/root LANG=C.UTF-8 TERM=dumb "$@"
}

boot() {  # boot MACHINE [NSPAWN OPTION...]: systemd as PID 1 of a container on $image
  local machine="$1" t0 state=""
  shift
  t0=$(now)
  # Host network (no --private-network): the container reaches PyPI and Debian's mirror
  # as a build instance reaches the internet, and the embedded AWS on loopback.
  # --register=no, --keep-unit: the host's PID 1 is not systemd (no machined, no bus).
  # --console=read-only: what goes to the container's /dev/console (the unit's
  # StandardOutput=journal+console) lands in $machine.console, as in get-console-output.
  # It keeps the cache's lock open (fd 9): while it runs from the image, no other run starts.
  systemd-nspawn -q -D "$image" -M "$machine" --register=no --keep-unit -b --console=read-only "$@" \
    </dev/null >"$run/$machine.console" 2>&1 &
  nspawn_pid=$!
  local until=$((SECONDS + 120))
  while ((SECONDS < until)); do
    kill -0 "$nspawn_pid" 2>/dev/null || break
    if [[ -n $(container_leader) ]]; then
      state=$(in_container systemctl is-system-running 2>/dev/null || true)
      [[ $state == running || $state == degraded ]] && break
    fi
    sleep 1
  done
  if [[ $state != running && $state != degraded ]]; then
    tail -n 20 "$run/$machine.console" >&2 || true
    die "$machine did not boot (systemd says '${state:-nothing}'; console in $run/$machine.console)"
  fi
  if [[ $state == degraded ]]; then
    in_container systemctl --failed --no-pager --no-legend >"$run/$machine.failed-units" || true
    say "$machine is up but degraded: $(awk '{print $1}' "$run/$machine.failed-units" | xargs)"
  fi
  say "$machine booted with systemd as PID 1 in $(since "$t0") s"
}

halt() {  # stop the container as a shutdown would, and wait for it
  [[ -n $nspawn_pid ]] || return 0
  local machine="$1"
  if kill -0 "$nspawn_pid" 2>/dev/null; then
    # nspawn turns SIGTERM into an orderly poweroff of the container.
    kill -TERM "$nspawn_pid" 2>/dev/null || true
    local until=$((SECONDS + 90))
    while kill -0 "$nspawn_pid" 2>/dev/null && ((SECONDS < until)); do sleep 1; done
    if kill -0 "$nspawn_pid" 2>/dev/null; then
      say "$machine did not power off within 90 s: killing it"
      kill -KILL "$nspawn_pid" 2>/dev/null || true
    fi
  fi
  wait "$nspawn_pid" 2>/dev/null || true
  nspawn_pid=""
  # nspawn leaves this folder where /run is not a tmpfs (as on this kind of VM).
  rmdir "/run/systemd/nspawn/propagate/$machine" 2>/dev/null || true
}

secs() { if [[ -n $1 ]]; then echo "$1 s"; else echo "${2:-never}"; fi; }
summary() {
  summarised=true
  echo
  echo "==================== ami/smoke.sh summary ===================="
  printf '%s\n' "${results[@]}"
  echo "--------------------------------------------------------------"
  echo "debootstrap (bookworm root)       : $prepare_s"
  echo "provision.sh                      : $provision_s"
  echo "user-data start -> unit active    : $(secs "$first_ready_s")"
  echo "user-data start -> first answer   : $(secs "$answer_s")"
  echo "SIGKILL -> restarted and ready    : $(secs "$restart_s")"
  echo "SIGKILL -> the burst all answered : $(secs "$burst_s")"
  echo "systemctl stop (SIGTERM) -> ended : $(secs "$stop_s" "not done")"
  echo "S3 weights: user-data -> active   : $(secs "$s3_ready_s") (download and conversion included)"
  echo "S3 weights: user-data -> answer   : $(secs "$s3_answer_s")"
  echo "S3 weights: poweroff, serving     : $(secs "$poweroff_s" "not done")"
  echo "whole run                         : $(since "$t_all") s"
  echo "logs                              : $run"
  if ((failed)); then echo "RESULT: FAIL"; else echo "RESULT: PASS"; fi
}

cleanup() {
  local status=$?
  set +e
  halt "$current_machine"
  if ! $summarised && [[ -n $t_all ]]; then
    fail "stopped early (exit status $status): see the lines above"
    summary
  fi
  for pid in "$imds_pid" "$moto_pid"; do
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"; wait "$pid" 2>/dev/null
    fi
  done
  if $clean; then
    remove_root "$image" && remove_root "$base" && rm -f "$cache/base.ok" "$cache/image.ok"
    say "removed the cached roots in $cache (logs of this run kept in $run)"
  fi
  if mounted_under "$cache"; then
    say "WARNING: still mounted under $cache:"; findmnt -rn -o TARGET | awk -v d="$cache" 'index($0, d) == 1'
  fi
  exit "$status"
}
need() {  # need COMMAND PACKAGE
  command -v "$1" >/dev/null && return 0
  command -v apt-get >/dev/null || die "$1 is missing (package $2) and there is no apt-get to install it"
  say "installing $2 on this machine with apt-get (for $1)"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2"
}
need debootstrap debootstrap
need systemd-nspawn systemd-container
need nsenter util-linux
need pgrep procps
need curl curl

# Made root's alone (0700), then looked at again: one made meanwhile by another is refused.
[[ -d $cache ]] || install -d -m 0700 "$cache"
check_cache
# One run at a time per cache: the machines' names, the image and the logs are shared.
exec 9>"$cache/.lock"
lock_holders() {  # the processes other than this script that have the lock open, one a line
  local fd pid pids=()
  for fd in /proc/[0-9]*/fd/*; do
    [[ $(readlink "$fd" 2>/dev/null) == "$cache/.lock" ]] || continue
    pid=${fd#/proc/}; pid=${pid%%/*}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] || pids+=("$pid")
  done
  for pid in $(printf '%s\n' "${pids[@]}" | sort -un); do
    printf '  %s: %s\n' "$pid" "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c 1-120)"
  done
}
# The lock is held by the containers too (they inherit it): one that outlived a killed run
# still runs from the image, which no run may replace or remove while it does.
flock -n 9 || die "another ami/smoke.sh is running on $cache; these hold its lock (a container left by" \
  "a run that was killed shows as systemd-nspawn: end it with kill PID, nspawn powers it off):"$'\n'"$(lock_holders)"
# Only now, with the lock held: a run refused above (or one that dies before the lock)
# must not reach cleanup, whose --clean would remove the roots another run has booted.
# (That run's mounts are in its containers' namespaces: findmnt here would not see them.)
current_machine=$build_machine
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
remove_root "$run" || die "cannot clear $run"
mkdir -p "$run/state"
t_all=$(now)

# --- the build instance: a stock bookworm root --------------------------------------
if [[ ! -f $cache/base.ok ]]; then
  say "debootstrap $suite into $base (once; cached for the next runs)"
  t0=$(now)
  remove_root "$base.partial" && remove_root "$base" || die "cannot clear $base"
  # systemd and dbus: a cloud image boots with them. Nothing else: provision.sh must
  # install what it needs itself (python3.11, curl, ca-certificates).
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus "$suite" "$base.partial" "$mirror" \
    >"$run/debootstrap.log" 2>&1 || { tail -n 20 "$run/debootstrap.log" >&2; die "debootstrap failed"; }
  mv "$base.partial" "$base"
  touch "$cache/base.ok"
  prepare_s="$(since "$t0") s"
fi

if $reuse_image; then
  [[ -f $cache/image.ok ]] || die "--reuse-image: no provisioned image in $image (run without it first)"
  say "reusing the image provisioned on $(date -r "$cache/image.ok" '+%F %T')"
else
  rm -f "$cache/image.ok"
  remove_root "$image" || die "cannot clear $image"
  cp -a --reflink=auto "$base" "$image"

  # --- the bake: bake.sh's tarball, provision.sh as Packer runs it ------------------
  "$repo/ami/bake.sh" --pack-only "$run/imgclass-src.tar.gz" | sed 's/^/    /'
  # Where this machine reaches PyPI through a TLS-inspecting proxy, its CA is among the
  # local ones: pip in the build container must trust it too, as on a build instance
  # behind such a proxy. Its bundle, with them, is bound read-only into the container's
  # /run (a tmpfs of the build boot's own) and named to pip alone (PIP_CERT): nothing of
  # it enters the image, whose trust stays Debian's, as a real bake's.
  provision_env=()
  build_options=()
  local_cas=(/usr/local/share/ca-certificates/*.crt)
  host_bundle=/etc/ssl/certs/ca-certificates.crt
  if [[ -e ${local_cas[0]} && -f $host_bundle ]]; then
    say "pip in the build container trusts this machine's CA bundle (local CAs: ${local_cas[*]##*/})," \
      "bound read-only at /run/host-ca.pem for the bake only"
    build_options+=("--bind-ro=$(realpath "$host_bundle"):/run/host-ca.pem")
    provision_env+=(PIP_CERT=/run/host-ca.pem)
  fi
  boot "$build_machine" "${build_options[@]}"
  # Packer's file provisioner, then its shell provisioner (worker.pkr.hcl): the tarball
  # in /tmp (a tmpfs here as on Amazon Linux 2023), the script run with sudo env VARS bash.
  in_container sh -c 'cat > /tmp/imgclass-src.tar.gz' <"$run/imgclass-src.tar.gz"
  in_container sh -c 'cat > /tmp/provision.sh && chmod +x /tmp/provision.sh' <"$here/provision.sh"
  say "running ami/provision.sh in $build_machine (pip installs TensorFlow and OpenVINO: minutes)"
  t0=$(now)
  if in_container env "${provision_env[@]}" SRC_TARBALL=/tmp/imgclass-src.tar.gz WEIGHTS_SOURCE=none \
    bash /tmp/provision.sh \
    >"$run/provision.log" 2>&1; then
    provision_s="$(since "$t0") s"
    pass "provision.sh ran to the end ($provision_s; log: $run/provision.log)"
  else
    provision_s="failed after $(since "$t0") s"
    tail -n 30 "$run/provision.log" >&2
    fail "provision.sh failed (log: $run/provision.log)"
    exit 1
  fi
  halt "$build_machine"
  touch "$cache/image.ok"
fi

# --- what the image holds, read from outside ------------------------------------------
trusts_no_local_ca() {  # none of this machine's local CAs in the image, nor in its bundle
  local ca
  ! compgen -G "$image/usr/local/share/ca-certificates/*" >/dev/null || return 1
  for ca in /usr/local/share/ca-certificates/*.crt; do
    [[ -e $ca ]] || continue
    ! grep -qF -- "$(sed -n 5p "$ca")" "$image/etc/ssl/certs/ca-certificates.crt" || return 1
  done
}
check "the image trusts none of this machine's local CAs (Debian's bundle, as a real bake's)" trusts_no_local_ca
check "the unit is installed as ami/ has it" \
  cmp -s "$here/imgclass-worker.service" "$image/etc/systemd/system/imgclass-worker.service"
check "the unit is not enabled in the image" \
  test ! -e "$image/etc/systemd/system/multi-user.target.wants/imgclass-worker.service"
check "the image has an empty /etc/machine-id" test -f "$image/etc/machine-id" -a ! -s "$image/etc/machine-id"
check "the image has no worker.env" test ! -e "$image/etc/imgclass/worker.env"
check "the code is root's, without tests/" \
  bash -c '[[ $(stat -c %U "$1/opt/imgclass/app_tier/worker.py") == root && ! -e $1/opt/imgclass/tests ]]' _ "$image"
check "the network is cached as OpenVINO IR in the service user's home" \
  bash -c 'compgen -G "$1/var/lib/imgclass/.cache/imgclass/resnet50-*.xml" >/dev/null' _ "$image"

# --- the embedded AWS and the stand-in metadata service on the host -----------------
free_port() { "$python" -c 'from localaws.harness import free_port; print(free_port())'; }
cd "$repo"
aws_port=$(free_port)
imds_port=$(free_port)
export PYTHONPATH="$repo" AWS_ENDPOINT_URL="http://127.0.0.1:$aws_port" AWS_REGION=us-east-1 \
  AWS_DEFAULT_REGION=us-east-1 APP_PREFIX=imgclass-smoke MODEL_WEIGHTS=random
unset AWS_PROFILE AWS_DEFAULT_PROFILE  # a profile that is not there would stop boto3 first
# No keys here: smoke_host.py signs with throwaway ones of its own, and the worker gets
# others from the stand-in IMDS, as from an instance profile.
# 9>&-: neither this nor the stand-in IMDS holds the cache's lock, should it outlive the run.
"$python" -m localaws.moto_server -H 127.0.0.1 -p "$aws_port" >"$run/moto.log" 2>&1 9>&- &
moto_pid=$!
for _ in $(seq 120); do
  curl -fsS -o /dev/null "$AWS_ENDPOINT_URL/moto-api/" 2>/dev/null && break
  kill -0 "$moto_pid" 2>/dev/null || die "the embedded AWS did not start (log: $run/moto.log)"
  sleep 1
done
say "embedded AWS on $AWS_ENDPOINT_URL"
"$python" ami/smoke_host.py launch "$run/state"
instance_id=$(cat "$run/state/instance-id")
"$python" ami/smoke_host.py imds "$run/state" "$imds_port" >"$run/imds.log" 2>&1 9>&- &
imds_pid=$!
# The request waits on the queue before the instance boots, as a backlog that made the
# controller launch would: the time to its answer is the worker's start to first answer.
"$python" ami/smoke_host.py send "$run/state" first

# --- the instance: first boot of the image, the user-data, the unit ------------------
start_instance() {  # start_instance MACHINE STATE_DIR: boot, then the user-data; sets t_start
  local machine="$1" state_dir="$2"
  current_machine=$machine
  # --volatile=overlay: the instance writes to a throwaway layer over the image, as an
  # instance writes to its own volume made from the AMI's snapshot. So every boot is the
  # image's first (--reuse-image included), and the checks above stay true of it.
  boot "$machine" --volatile=overlay
  in_container mkdir -p /run/imgclass-smoke /run/systemd/system/imgclass-worker.service.d
  # The two smoke-only changes, both in /run (gone at the next boot; the image is not
  # touched): curl's connections to the metadata address go to the stand-in (the
  # user-data's URLs are not changed), and botocore asks the stand-in, not 169.254.169.254,
  # for the instance profile's credentials.
  echo "connect-to = 169.254.169.254:80:127.0.0.1:$imds_port" \
    | in_container sh -c 'cat > /run/imgclass-smoke/.curlrc'
  printf '[Service]\nEnvironment=AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:%s/\n' "$imds_port" \
    | in_container sh -c 'cat > /run/systemd/system/imgclass-worker.service.d/smoke.conf'
  in_container systemctl daemon-reload
  in_container sh -c 'cat > /run/imgclass-smoke/user-data' <"$state_dir/user-data"

  say "running the user-data as cloud-init would (root, once)"
  t_start=$(now)
  if in_container env CURL_HOME=/run/imgclass-smoke bash /run/imgclass-smoke/user-data \
    >"$run/$machine.user-data.log" 2>&1; then
    pass "the user-data ran on $machine ($(since "$t_start") s)"
  else
    cat "$run/$machine.user-data.log" >&2
    fail "the user-data failed on $machine (log: $run/$machine.user-data.log)"
  fi
}

wait_active() {  # sets ready_s once the unit is active, within the deadline
  # Type=notify: active only once the worker said READY=1 (model loaded, serving).
  local state=""
  ready_s=""
  local until=$((SECONDS + deadline))
  while ((SECONDS < until)); do
    state=$(in_container systemctl is-active imgclass-worker 2>/dev/null || true)
    if [[ $state == active ]]; then ready_s=$(since "$t_start"); break; fi
    [[ $state == failed ]] && break
    sleep 0.5
  done
  if [[ -n $ready_s ]]; then
    pass "the unit is active: the worker told systemd READY=1 ($ready_s s after the user-data started it)"
  else
    fail "the unit never became active (last state: ${state:-unknown})"
  fi
}

start_instance "$instance_machine" "$run/state"
check "systemd gave the instance a machine id of its own" \
  bash -c '[[ $1 =~ ^[0-9a-f]{32}$ ]]' _ "$(in_container cat /etc/machine-id 2>/dev/null)"
in_container cat /etc/imgclass/worker.env >"$run/worker.env" 2>/dev/null || true
check "worker.env names the instance" grep -qx "INSTANCE_ID=$instance_id" "$run/worker.env"
check "worker.env points at the embedded AWS" grep -qx "AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL" "$run/worker.env"
check "worker.env is root's alone (0600)" \
  test "$(in_container stat -c '%U %a' /etc/imgclass/worker.env 2>/dev/null)" = "root 600"
check "the user-data enabled the unit" \
  test "$(in_container systemctl is-enabled imgclass-worker 2>/dev/null)" = enabled
wait_active
first_ready_s=$ready_s
unit() { in_container systemctl show -P "$1" imgclass-worker 2>/dev/null || true; }
main_pid=$(unit MainPID)
check "the worker runs as imgclass" test "$(in_container stat -c %U "/proc/$main_pid" 2>/dev/null)" = imgclass

answer() {  # answer STATE_DIR NAME SINCE: the request NAME answered as it should be
  [[ -n $ready_s ]] && "$python" ami/smoke_host.py answer "$1" "$2" "$3" "$deadline" \
    | tee -a "$run/answer.log"
}
answer_s=""
if answer "$run/state" first "$t_start"; then
  answer_s=$(cat "$run/state/first.answered-after")
  pass "the worker answered the request, stored name,label and tagged its instance ready"
else
  fail "the request was not answered as it should be (see $run/answer.log)"
fi
check "the worker's log reaches the console (StandardOutput=journal+console)" \
  grep -q "worker $instance_id: serving" "$run/$instance_machine.console"

# The worker pings every WatchdogSec/2 (30 s): a ping seen well after READY=1 proves the
# pings get through (NotifyAccess=main, the sandbox); none would have it killed at 60 s.
watchdog_ok=false
until=$((SECONDS + 50))
while [[ -n $ready_s ]] && ((SECONDS < until)); do
  if (($(unit WatchdogTimestampMonotonic) > $(unit ActiveEnterTimestampMonotonic) + 20000000)); then
    watchdog_ok=true; break
  fi
  sleep 1
done
check "the worker pings systemd's watchdog (WatchdogSec=60)" $watchdog_ok

# A worker killed in the middle of a burst (SIGKILL: no hand-back of its own) is
# restarted after RestartSec=5, once its ExecStopPost (--show-held-only, as imgclass in
# the same sandbox) has made visible again what its journal says it held, so that those
# requests do not wait out VISIBILITY_TIMEOUT. That it holds some when killed is not left
# to timing: it is frozen (SIGSTOP) first, and killed only if its journal of held
# receipts names some then; else (it had answered them all) it goes on, and another,
# larger burst is sent.
held_now() {  # how many requests the frozen worker's journal names, hidden for 5 s more at least
  local text
  # app_tier/held_journal.py's file, in the unit's HOME (written whole, then renamed).
  text=$(in_container sh -c 'for f in /var/lib/imgclass/.local/state/imgclass/*-held-*.json; do
      [ -e "$f" ] && exec cat "$f"; done' 2>/dev/null) || true
  "$python" -c 'import json, sys, time
text = sys.stdin.read()
print(sum(h["hidden_until"] > time.time() + 5 for h in json.loads(text)["held"]) if text.strip() else 0)' \
    <<<"$text" 2>/dev/null || echo 0
}
burst=40
sent=0
held_at_kill=0
t0=""
for attempt in 1 2 3; do
  "$python" ami/smoke_host.py burst "$run/state" burst "$burst" || break
  sent=$((sent + burst))
  in_container systemctl kill -s STOP --kill-whom=main imgclass-worker
  held_at_kill=$(held_now)
  if ((held_at_kill > 0)); then
    t0=$(now)
    in_container systemctl kill -s KILL --kill-whom=main imgclass-worker
    break
  fi
  in_container systemctl kill -s CONT --kill-whom=main imgclass-worker
  say "burst $attempt: the worker held none of it when frozen (all answered already): a larger one"
  burst=$((burst * 2))
done
if [[ -n $t0 ]]; then
  say "the worker was SIGKILLed holding $held_at_kill request(s) of a burst of $sent (its journal said)"
  until=$((SECONDS + 120))
  while ((SECONDS < until)); do
    if [[ $(unit NRestarts) -ge 1 && $(unit ActiveState) == active ]]; then restart_s=$(since "$t0"); break; fi
    sleep 0.5
  done
  if [[ -n $restart_s ]]; then
    pass "SIGKILLed in a burst of $sent requests, the worker was restarted and ready again in $restart_s s"
  else
    fail "the killed worker was not restarted (state $(unit ActiveState), restarts $(unit NRestarts))"
  fi
  journal=$(in_container journalctl -u imgclass-worker --no-pager 2>/dev/null || true)
  check "its ExecStopPost ran without error" \
    bash -c '! grep -q "imgclass-worker.service: Control process exited, code=" <<<"$1"' _ "$journal"
  held=$(grep -o "made [1-9][0-9]* request(s) visible again that [^:]* held when it ended" <<<"$journal" \
    | head -n 1 || true)
  check "what the killed worker held was made visible again at once (${held:-no such line})" test -n "$held"
  t1=$(now)
  if "$python" ami/smoke_host.py answers "$run/state" burst "$deadline" | tee -a "$run/answer.log"; then
    burst_s=$(since "$t0")
    pass "every request of the burst was answered, by the instance ($burst_s s after the kill)"
  else
    fail "the burst was not all answered within $(since "$t1") s (see $run/answer.log)"
  fi
elif ((sent > 0)); then
  fail "the worker held nothing of $attempt bursts ($sent requests) when frozen: it was not killed"
else
  fail "no request of the burst was answered: the worker was not killed"
fi

# What the instance's shutdown does first: systemd stops the unit with SIGTERM.
t0=$(now)
in_container systemctl stop imgclass-worker || true
stop_s=$(since "$t0")
result=$(unit Result)
main_end="$(unit ExecMainCode)/$(unit ExecMainStatus)"
in_container journalctl -u imgclass-worker --no-pager -o short-precise >"$run/worker.journal" 2>&1 || true
check "SIGTERM stopped the worker cleanly in $stop_s s (Result=$result, code/status $main_end)" \
  test "$result" = success -a "$main_end" = 1/0
check "the worker shut down warm (its log says it stopped)" \
  grep -Eq "worker $instance_id: stopped after [0-9]+ images" "$run/worker.journal"

halt "$instance_machine"

# --- a second instance: MODEL_WEIGHTS=s3://..., fetched and converted under the unit ---
# The path a new weights file takes (README, The ResNet-50 weights, 2.): the worker
# downloads it with the instance profile's keys into HOME (ReadWritePaths), and converts
# it with TensorFlow to OpenVINO IR, all in the unit's sandbox. Keras's random
# initialisation stands in for ImageNet's file, which cannot be had here.
say "making a ResNet-50 weights file on this machine and putting it in the embedded AWS's S3"
s3_state="$run/state-s3"
mkdir -p "$s3_state"
weights_uri=$("$python" ami/smoke_host.py weights "$s3_state" 2>"$run/weights.log" | tail -n 1)
if [[ $weights_uri != s3://* ]]; then
  fail "could not make the weights file (log: $run/weights.log)"
else
  MODEL_WEIGHTS="$weights_uri" "$python" ami/smoke_host.py launch "$s3_state"
  # Already dead (it should not be): the next one is started all the same, and the
  # checks below say what failed, rather than set -e ending the run here.
  kill -TERM "$imds_pid" 2>/dev/null || true; wait "$imds_pid" 2>/dev/null || true
  "$python" ami/smoke_host.py imds "$s3_state" "$imds_port" >>"$run/imds.log" 2>&1 9>&- &
  imds_pid=$!
  MODEL_WEIGHTS="$weights_uri" "$python" ami/smoke_host.py send "$s3_state" first
  start_instance "$s3_machine" "$s3_state"
  wait_active
  s3_ready_s=$ready_s
  if MODEL_WEIGHTS="$weights_uri" answer "$s3_state" first "$t_start"; then
    s3_answer_s=$(cat "$s3_state/first.answered-after")
    pass "with weights from S3, the instance answered, not flagged untrained ($s3_answer_s s)"
  else
    fail "with weights from S3, the request was not answered as it should be (see $run/answer.log)"
  fi
  in_container journalctl -u imgclass-worker --no-pager -o short-precise >"$run/worker-s3.journal" 2>&1 || true
  check "the worker fetched the weights into its home and converted them" \
    bash -c 'grep -q "fetched s3://" "$1" && grep -q "converted ResNet-50" "$1"' _ "$run/worker-s3.journal"
  # This one is not stopped first: the instance is powered off with its worker serving,
  # as EC2's termination does. Its journal goes with the overlay; the console keeps its
  # last lines, as get-console-output would.
  s3_id=$(cat "$s3_state/instance-id")
  t0=$(now)
  halt "$s3_machine"
  poweroff_s=$(since "$t0")
  check "powered off, the instance stopped its worker warm ($poweroff_s s)" \
    grep -q "worker $s3_id: stopped after 1 images" "$run/$s3_machine.console"
  check "within TimeoutStopSec (no SIGKILL)" \
    bash -c '! grep -q "imgclass-worker.service: State .stop-sigterm. timed out" "$1"' _ "$run/$s3_machine.console"
fi
current_machine=""
$clean || say "the image stays in $image (--reuse-image boots it again; --clean removes it)"

summary
((failed == 0)) || exit 1
