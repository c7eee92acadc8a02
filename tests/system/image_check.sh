#!/usr/bin/env bash
# The OCI image (Containerfile), proven without a registry and without a container engine's runtime:
# builds it with buildah on a Debian base made here with debootstrap, unpacks it with skopeo + umoci, and runs
# what the image's config says (Entrypoint + Cmd as its User, with its Env, WorkingDir, Volumes and
# StopSignal) under systemd-nspawn, as docker would. Then: a pair dropped into the mounted inbox becomes an
# MP4, the image's HEALTHCHECK command passes while the daemon runs and fails once it stopped, the stop
# signal drains and exits 0, no process is left, and the image's size. Run as root on a Debian/Ubuntu host:
# `sudo make image-check`. (`podman run` does not work on such CI hosts: crun refuses hybrid cgroups.)
#
# Environment:
#   IMAGE_CHECK_CACHE  folder kept between runs: the base rootfs and the wheels
#                      (default /var/cache/heygem-image-check; delete it to rebuild)
#   IMAGE_CHECK_KEEP=1 leave the unpacked image and its volumes in place after the run
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${IMAGE_CHECK_CACHE:-/var/cache/heygem-image-check}"
CHECK=image-check
START=$SECONDS
. "$REPO/tests/system/common.sh"

check_begin buildah:buildah podman:podman skopeo:skopeo umoci:umoci systemd-nspawn:systemd-container \
    debootstrap:debootstrap

# --- the base: a slim Debian with python3, its venv module and tini, from the host's apt mirror ---------
# Stands in for python:3.12-slim-bookworm (no registry here); trimmed the way Debian's slim images are.
PACKAGES=python3,python3-venv,tini,ca-certificates
BASE_ROOTFS="$CACHE/base-$SUITE"
BASE_IMAGE="localhost/heygem-image-check-base:$SUITE"
# What Debian's slim images leave out: package lists and downloaded .debs, documentation, man pages, locales.
TRIM="var/lib/apt/lists var/cache/apt usr/share/doc usr/share/man usr/share/locale"
if [ "$(cat "$BASE_ROOTFS/.complete" 2>/dev/null)" != "$MIRROR $PACKAGES $TRIM" ]; then
    log "building the $SUITE base rootfs from $MIRROR (minbase; cached in $BASE_ROOTFS)"
    rm -rf "$BASE_ROOTFS"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$BASE_ROOTFS" "$MIRROR" >&2 ||
        die "debootstrap failed (see above)"
    for dir in $TRIM; do find "$BASE_ROOTFS/$dir" -mindepth 1 -not -type d -delete; done
    podman rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
    echo "$MIRROR $PACKAGES $TRIM" >"$BASE_ROOTFS/.complete"
fi
if ! podman image exists "$BASE_IMAGE"; then
    tar --exclude=./.complete -C "$BASE_ROOTFS" -cf - . | podman import -q - "$BASE_IMAGE" >/dev/null
fi

# --- wheels on the host (its pip settings and indexes), the build context ------------------------------
# The build reads them with --find-links; what the base's Python needs beyond them (markers that depend on
# its exact version) comes from the index through the host's CA bundle, bound in for RUN steps only.
HOST_PY="$REPO/.venv/bin/python"
[ -x "$HOST_PY" ] || HOST_PY=python3
WHEELS="$CACHE/wheels"
mkdir -p "$WHEELS"
log "fetching wheels into $WHEELS"
(cd "$REPO" && "$HOST_PY" -m pip download -q -d "$WHEELS" --only-binary=:all: '.[web,remote]' 'setuptools>=64') \
    >"$CACHE/pip-download.log" 2>&1 || die "pip download failed: $(tail -20 "$CACHE/pip-download.log")"
CONTEXT="$CACHE/context"
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT"
git -C "$REPO" ls-files -z --cached --others --exclude-standard |
    (cd "$REPO" && tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$CONTEXT"
cp -al "$WHEELS" "$CONTEXT/wheels"

# --- build (docker format: OCI image configs have no HEALTHCHECK) -----------------------------------------
IMAGE=localhost/heygem-daemon:check
log "building $IMAGE (buildah bud --isolation chroot)"
build_start=$SECONDS
if buildah bud --isolation chroot --format docker --layers --quiet -f "$CONTEXT/Containerfile" \
        -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro \
        --build-arg BASE="$BASE_IMAGE" \
        --build-arg PIP_INSTALL_ARGS="--find-links /src/wheels --cert /run/host-ca.crt" \
        -t "$IMAGE" "$CONTEXT" >&2; then
    pass "build ($((SECONDS - build_start)) s)"
else
    fail "build"
    exit 1
fi
buildah rmi --prune >/dev/null 2>&1 || true

mib() { echo $(( ($1 + 1048575) / 1048576 )); }
image_size="$(podman image inspect --format '{{.Size}}' "$IMAGE")"
base_size="$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")"

# --- unpack it the OCI way and read its config -------------------------------------------------------------
WORK="$CACHE/run"
ROOTFS="$WORK/bundle/rootfs"
NSPAWN_PID=
cleanup() {
    local rc=$?
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        kill -KILL "$NSPAWN_PID" 2>/dev/null || true
        wait "$NSPAWN_PID" 2>/dev/null || true
    fi
    nspawn_leftovers_remove
    [ ${#FAILED[@]} = 0 ] || [ ! -f "$WORK/console.log" ] || log "the container's console, last lines:
$(tail -25 "$WORK/console.log")"
    [ "${IMAGE_CHECK_KEEP:-0}" = 1 ] || rm -rf "$WORK"
    log "passed: ${PASSED[*]:-none}"
    [ ${#FAILED[@]} = 0 ] || log "FAILED: ${FAILED[*]}"
    log "wall time $((SECONDS - START)) s"
    [ $rc = 0 ] && [ ${#FAILED[@]} = 0 ] || exit 1
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$WORK"
mkdir -p "$WORK"
skopeo copy -q "containers-storage:$IMAGE" "oci:$WORK/oci:check" >&2
umoci unpack --image "$WORK/oci:check" "$WORK/bundle" >/dev/null
# What a pull downloads: the compressed layers of the OCI copy.
pull_size="$(python3 - "$WORK/oci" <<'PY'
import json, pathlib, sys
oci = pathlib.Path(sys.argv[1])
blob = lambda d: oci / "blobs" / d["digest"].replace(":", "/")
manifest = json.loads(blob(json.loads((oci / "index.json").read_text())["manifests"][0]).read_text())
print(sum(layer["size"] for layer in manifest["layers"]))
PY
)"

# The image config as docker reads it (the docker-format config: the OCI one has no Healthcheck), one shell
# assignment per setting.
buildah inspect --type image "$IMAGE" >"$WORK/inspect.json"
eval "$(python3 - "$WORK/inspect.json" <<'PY'
import json, shlex, sys
c = json.load(open(sys.argv[1]))["Docker"]["config"]
def arr(name, items): print(f"{name}=({' '.join(shlex.quote(i) for i in items)})")
arr("ARGV", (c.get("Entrypoint") or []) + (c.get("Cmd") or []))
arr("ENVS", c.get("Env") or [])
arr("VOLUMES", sorted(c.get("Volumes") or {}))
arr("HEALTH", (c.get("Healthcheck") or {}).get("Test") or [])
print(f"USER_SPEC={shlex.quote(c.get('User') or 'root')}")
print(f"WORKDIR={shlex.quote(c.get('WorkingDir') or '/')}")
print(f"STOPSIGNAL={shlex.quote(c.get('StopSignal') or 'SIGTERM')}")
PY
)"
log "image config: User=$USER_SPEC Entrypoint+Cmd=${ARGV[*]} WorkingDir=$WORKDIR StopSignal=$STOPSIGNAL" \
    "Healthcheck=${HEALTH[*]} Volumes=${VOLUMES[*]}"
[ "${HEALTH[0]:-}" = CMD ] || die "the image's HEALTHCHECK is not an exec form: ${HEALTH[*]}"
HEALTH=("${HEALTH[@]:1}")
[ "$STOPSIGNAL" = SIGTERM ] && [ "$USER_SPEC" != root ] && [ "$USER_SPEC" != 0 ] &&
    pass "image-config (non-root $USER_SPEC, STOPSIGNAL $STOPSIGNAL, HEALTHCHECK ${HEALTH[*]})" ||
    fail "image-config" "User=$USER_SPEC StopSignal=$STOPSIGNAL"

# The user as the image's /etc/passwd names it.
user_name="${USER_SPEC%%:*}"
uid="$(awk -F: -v u="$user_name" '$1 == u || $3 == u { print $3; exit }' "$ROOTFS/etc/passwd")"
gid="$(awk -F: -v u="$user_name" '$1 == u || $3 == u { print $4; exit }' "$ROOTFS/etc/passwd")"
[ -n "$uid" ] || die "user $user_name is not in the image's /etc/passwd"

# Volumes as docker makes named ones: a host folder per VOLUME, seeded with the image's content there.
BINDS=()
for vol in "${VOLUMES[@]}"; do
    host="$WORK/volumes${vol}"
    mkdir -p "$host"
    cp -a "$ROOTFS$vol/." "$host/"
    chown --reference="$ROOTFS$vol" "$host"
    chmod --reference="$ROOTFS$vol" "$host"
    BINDS+=(--bind="$host:$vol")
done
DATA="$WORK/volumes/data"
[ -d "$DATA" ] || die "the image has no /data volume (VOLUMES: ${VOLUMES[*]})"

CONSOLE="$WORK/console.log"
SETENV=()
for e in "${ENVS[@]}"; do SETENV+=(--setenv="$e"); done
# As docker runs a container: the image's user, environment, working folder and volumes; the stop signal
# systemd-nspawn gets is handed to PID 1 as the image's STOPSIGNAL. A private network: the check must not
# meet ports of whatever else runs on this host.
export SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1
NSPAWN=(systemd-nspawn --quiet --directory="$ROOTFS" --register=no --keep-unit --private-network --console=pipe
        --user="$user_name" --chdir="$WORKDIR" --kill-signal="$STOPSIGNAL" "${SETENV[@]}" "${BINDS[@]}")

# --- run it ----------------------------------------------------------------------------------------------------
log "starting the image's command under systemd-nspawn (console: $CONSOLE)"
"${NSPAWN[@]}" -- "${ARGV[@]}" >"$CONSOLE" 2>"$WORK/stderr.log" </dev/null &
NSPAWN_PID=$!
CPID=
for _ in $(seq 30); do
    CPID="$(container_pid1 "$NSPAWN_PID" "$(basename "${ARGV[0]}")")" && break
    kill -0 "$NSPAWN_PID" 2>/dev/null || die "systemd-nspawn exited: $(tail -20 "$CONSOLE")"
    sleep 1
done
[ -n "$CPID" ] || die "no ${ARGV[0]} as the container's PID 1 after 30 s: $(tail -20 "$CONSOLE")"
console_has() { grep -q -- "$1" "$CONSOLE"; }
wait_until 60 "daemon ready" console_has 'daemon ready' || die "the daemon never got ready: $(tail -20 "$CONSOLE")"
pass "starts-as-pid1-under-tini"
# docker logs shows both streams, but the issue asks for stdout (the image sets logging.console_stream).
if grep -q 'daemon ready' "$WORK/stderr.log"; then
    fail "console-logs-on-stdout" "log lines on stderr: $(head -3 "$WORK/stderr.log")"
else
    pass "console-logs-on-stdout ($(grep -c . "$CONSOLE") lines so far, $(grep -c . "$WORK/stderr.log") on stderr)"
fi

# The HEALTHCHECK as docker runs it: in the container (its PID 1's working folder is the image's
# WorkingDir), as its user, with its environment.
healthcheck() {
    nsenter -t "$CPID" -a -r -w -S "$uid" -G "$gid" env -i "${ENVS[@]}" "${HEALTH[@]}"
}
t0=$(date +%s%N)
if said="$(healthcheck 2>&1)"; then
    pass "healthcheck-ready ($said, $(( ($(date +%s%N) - t0) / 1000000 )) ms)"
else
    fail "healthcheck-ready" "$said"
fi

# A pair dropped into the mounted inbox (the speech made by the image's own Python and numpy).
mkdir -p "$WORK/media"
cp "$REPO/tests/media_factory.py" "$WORK/media/"
cp -a "$WORK/media" "$ROOTFS/opt/check-media"
chroot "$ROOTFS" /opt/heygem-daemon/bin/python -c 'import sys; sys.path.insert(0, "/opt/check-media")
from pathlib import Path; from media_factory import write_speech_wav
write_speech_wav(Path("/opt/check-media/hello.wav"), 3.0); write_speech_wav(Path("/opt/check-media/long.wav"), 40.0)'
mv "$ROOTFS"/opt/check-media/*.wav "$WORK/media/"
rm -rf "$ROOTFS/opt/check-media"
cp "$REPO/tests/fixtures/portrait.jpg" "$DATA/inbox/hello.jpg"
cp "$WORK/media/hello.wav" "$DATA/inbox/hello.wav"
is_mp4() { [ -s "$1" ] && [ "$(dd if="$1" bs=1 skip=4 count=4 2>/dev/null)" = ftyp ]; }
if wait_until 120 "outputs/hello/hello.mp4" is_mp4 "$DATA/outputs/hello/hello.mp4"; then
    pass "pair-to-mp4 ($(stat -c %s "$DATA/outputs/hello/hello.mp4") bytes, owner $(stat -c %u "$DATA/outputs/hello/hello.mp4"))"
else
    fail "pair-to-mp4" "$(tail -15 "$CONSOLE")"
fi

# --- the stop signal while a task renders: it finishes (drained), exit 0, nothing left ----------------------------
cp "$REPO/tests/fixtures/portrait.jpg" "$DATA/inbox/long.jpg"
cp "$WORK/media/long.wav" "$DATA/inbox/long.wav"
wait_until 90 "the long task to start" console_has 'task started.*task=long' ||
    fail "sigterm-drained-exit-0" "the long task never started: $(tail -8 "$CONSOLE")"
pid_ns="$(readlink "/proc/$CPID/ns/pid")"
in_container() {  # the processes of the container's pid namespace, "pid comm" each
    local p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/ns/pid" 2>/dev/null)" = "$pid_ns" ] && echo "${p#/proc/} $(cat "$p/comm" 2>/dev/null)"
    done
    return 0
}
log "processes in the container: $(in_container | tr '\n' ' ')"
log "sending SIGTERM to systemd-nspawn (which sends the image's $STOPSIGNAL to the container's PID 1)"
kill -TERM "$NSPAWN_PID"
stop_rc=0
for _ in $(seq 120); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 1; done
if kill -0 "$NSPAWN_PID" 2>/dev/null; then
    fail "sigterm-drained-exit-0" "still running 120 s after SIGTERM"
else
    wait "$NSPAWN_PID" || stop_rc=$?
    NSPAWN_PID=
    if [ "$stop_rc" = 0 ] && console_has 'draining' && console_has 'task done.*task=long' &&
            is_mp4 "$DATA/outputs/long/long.mp4" && console_has 'stopped'; then
        pass "sigterm-drained-exit-0 (the running task finished first)"
    else
        fail "sigterm-drained-exit-0" "exit $stop_rc: $(tail -8 "$CONSOLE")"
    fi
fi
left="$(in_container)"
if [ -z "$left" ]; then pass "no-process-left"; else fail "no-process-left" "$left"; fi

# The same HEALTHCHECK in a fresh container on the same volumes, the daemon stopped: it must fail, and say why.
nspawn_leftovers_remove
if said="$("${NSPAWN[@]}" -- "${HEALTH[@]}" 2>&1 </dev/null)"; then
    fail "healthcheck-fails-when-stopped" "exit 0: $said"
elif grep -q 'not running' <<<"$said"; then
    pass "healthcheck-fails-when-stopped ($(grep -m1 'not running' <<<"$said"))"
else
    fail "healthcheck-fails-when-stopped" "$said"
fi

# --- size ------------------------------------------------------------------------------------------------------
log "sizes: image $(mib "$image_size") MiB unpacked ($(mib "$base_size") MiB of it the base), $(mib "$pull_size") MiB to pull (compressed layers)"
# The issue's 400 MB holds for the pull, not unpacked: 540 MiB measured, of which the base is 124, PyAV's FFmpeg
# 101, OpenCV 159 (its own FFmpeg and OpenBLAS among it), numpy 56 (README "Run in containers"). The unpacked
# budget is that figure with room for dependency updates, so a new heavy dependency shows here.
PULL_BUDGET_MIB=400
UNPACKED_BUDGET_MIB=570
if [ "$(mib "$pull_size")" -lt "$PULL_BUDGET_MIB" ] && [ "$(mib "$image_size")" -lt "$UNPACKED_BUDGET_MIB" ]; then
    pass "size ($(mib "$pull_size") MiB compressed, $(mib "$image_size") MiB unpacked)"
else
    fail "size" "$(mib "$pull_size") MiB compressed (budget $PULL_BUDGET_MIB), $(mib "$image_size") MiB unpacked (budget $UNPACKED_BUDGET_MIB)"
fi
