#!/usr/bin/env bash
# The unit under a real systemd: boots a minimal Debian/Ubuntu container (systemd-nspawn --boot), replays
# the README's "Install as a service" block cut out of README.md (between the systemd-check-install
# markers, so the docs cannot drift), and checks what the unit promises; then boots a second container as a
# GPU host and replays README "Many GPU hosts"'s worker-host block (the systemd-check: worker markers) the
# same way. Run as root on a Debian/Ubuntu host: `sudo make systemd-check`. Works on a host whose PID 1 is
# not systemd (CI containers).
#
# Environment:
#   SYSTEMD_CHECK_CACHE  folder kept between runs: the pristine rootfs and pip's cache
#                        (default /var/cache/heygem-systemd-check; delete it to rebuild)
#   SYSTEMD_CHECK_KEEP=1 leave the containers' rootfs in place after the run (for a look around)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${SYSTEMD_CHECK_CACHE:-/var/cache/heygem-systemd-check}"
CHECK=systemd-check
START=$SECONDS
. "$REPO/tests/system/common.sh"

# Installing systemd-container upgrades the host's systemd packages to the matching point release.
check_begin systemd-nspawn:systemd-container debootstrap:debootstrap

# --- the rootfs: the host's own distribution and release, from the host's own apt mirror -------------
# procps: /bin/kill, which the unit's ExecReload= uses (every non-minimal install has it).
PACKAGES=systemd,dbus,python3,python3-venv,make,git,sudo,ca-certificates,procps
PRISTINE="$CACHE/rootfs-$SUITE"
if [ "$(cat "$PRISTINE/.complete" 2>/dev/null)" != "$MIRROR $PACKAGES" ]; then
    log "building the $SUITE rootfs from $MIRROR (minbase; takes a few minutes, cached in $PRISTINE)"
    rm -rf "$PRISTINE"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$PRISTINE" "$MIRROR" >&2 ||
        die "debootstrap failed (see above)"
    # The same mirror inside, for anything apt needs later; a root password is not needed (nsenter).
    echo "deb $MIRROR $SUITE main" >"$PRISTINE/etc/apt/sources.list"
    echo "$MIRROR $PACKAGES" >"$PRISTINE/.complete"
fi
if [ "${1:-}" = --rootfs-only ]; then log "rootfs ready: $PRISTINE"; exit 0; fi

# --- a fresh container from the pristine rootfs --------------------------------------------------------
ROOT="$CACHE/run"
MACHINE=heygem-check
WROOT="$CACHE/run-worker"
rm -rf "$ROOT" "$WROOT"
cp -a --reflink=auto "$PRISTINE" "$ROOT"
mkdir -p "$CACHE/pip-cache"

# The project as it is in this worktree (committed or not), as a git repository the README clones.
SRC=/src/heygem-daemon
mkdir -p "$ROOT$SRC"
git -C "$REPO" ls-files -z --cached --others --exclude-standard |
    (cd "$REPO" && tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$ROOT$SRC"
git -C "$ROOT$SRC" init -q
git -C "$ROOT$SRC" add -A
git -C "$ROOT$SRC" -c user.name=systemd-check -c user.email=check@localhost commit -qm "worktree copy"

# pip inside uses the host's package index settings and CA bundle; local folders they name (file://
# indexes, find-links) are bound in read-only at the same place, files they name (constraints) copied.
BINDS=(--bind="$CACHE/pip-cache:/root/.cache/pip")
PIP_ENV=()
while IFS='=' read -r name value; do
    PIP_ENV+=("$name=$value")
done < <(env | grep -E '^PIP_[A-Z_]+=' || true)
{
    cat /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf" 2>/dev/null || true
    printf '%s\n' "${PIP_ENV[@]}"
} | grep -oE "(file://)?/[^ ,\"']+" | sed -e 's|^file://||' -e 's|/$||' | sort -u >"$CACHE/pip-paths"
while read -r path; do
    # A local index's pages link to files beside it (<root>/simple -> <root>/files): bind its root.
    [ "$(basename "$path")" = simple ] && path="$(dirname "$path")"
    if [ -d "$path" ]; then BINDS+=(--bind-ro="$path"); fi
done <"$CACHE/pip-paths"
pip_settings_into() {  # rootfs: the pip configuration files, the files they name (constraints), the CA bundle
    local conf dest path
    for conf in /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
        [ -f "$conf" ] || continue
        dest="$1${conf/#$HOME//root}"
        mkdir -p "$(dirname "$dest")"
        cp "$conf" "$dest"
    done
    while read -r path; do
        [ -f "$path" ] || continue
        mkdir -p "$1$(dirname "$path")"
        cp "$path" "$1$path"
    done <"$CACHE/pip-paths"
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/ca-certificates.crt"
    fi
}
pip_settings_into "$ROOT"

# A shorter watchdog and restart delay than the shipped unit, so the frozen-daemon check takes seconds.
mkdir -p "$ROOT/etc/systemd/system/heygem-daemon.service.d"
cat >"$ROOT/etc/systemd/system/heygem-daemon.service.d/zz-systemd-check.conf" <<'CONF'
# Written by tests/system/systemd_check.sh (not part of an install).
[Service]
WatchdogSec=6
RestartSec=1
TimeoutAbortSec=30
CONF

# --- boot ------------------------------------------------------------------------------------------------
# On a host whose PID 1 is not systemd: the unified cgroup hierarchy and the bpf() system call let the
# container's systemd enforce DevicePolicy= (without them it is silently not enforced); no machined to
# register with, so --register=no --keep-unit, and commands go in with nsenter. nspawn makes its payload/ and
# supervisor/ cgroups below its own: a second container starts from a cgroup of its own (CGROUP_BELOW).
NSPAWN_PIDS=()
CGROUP_BELOW=heygem-check-worker-host
poweroff() {
    local i pid
    for ((i = ${#NSPAWN_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${NSPAWN_PIDS[i]}
        kill -0 "$pid" 2>/dev/null || continue
        log "powering container $((i + 1)) off"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    nspawn_leftovers_remove
    local mount own
    while read -r mount own; do
        [ -d "$mount${own%/}/$CGROUP_BELOW" ] && find "$mount${own%/}/$CGROUP_BELOW" -depth -type d -exec rmdir {} + 2>/dev/null
    done < <(own_cgroups)
    if [ "${SYSTEMD_CHECK_KEEP:-0}" != 1 ]; then rm -rf "$ROOT" "$WROOT"; fi
}
report() {
    local rc=$?
    poweroff
    log "passed: ${PASSED[*]:-none}"
    [ ${#FAILED[@]} = 0 ] || log "FAILED: ${FAILED[*]}"
    log "wall time $((SECONDS - START)) s"
    [ $rc = 0 ] && [ ${#FAILED[@]} = 0 ] || exit 1
}
trap report EXIT
trap 'exit 130' INT TERM

inside_of() {  # the container's PID 1 on the host, command...
    local pid1=$1; shift
    nsenter -t "$pid1" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0 "${PIP_ENV[@]}" "$@"
}
# rootfs, machine, cgroup below ours or "", extra systemd-nspawn options... -> BOOTED (its PID 1 on the host)
boot() {
    local root=$1 machine=$2 below=$3; shift 3
    local console="$CACHE/console-$machine.log" nspawn pid1= state= mount own
    echo "$machine" >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$machine" >"$root/etc/hosts"  # as the Debian installer writes
    log "booting $SUITE as $machine with systemd-nspawn (console: $console)"
    if [ -n "$below" ]; then
        while read -r mount own; do mkdir -p "$mount${own%/}/$below"; done < <(own_cgroups)
    fi
    (
        if [ -n "$below" ]; then
            while read -r mount own; do echo "$BASHPID" >"$mount${own%/}/$below/cgroup.procs"; done < <(own_cgroups)
        fi
        SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 exec setsid systemd-nspawn --boot --directory="$root" --machine="$machine" \
            --register=no --keep-unit --system-call-filter=bpf --console=read-only "${BINDS[@]}" "$@" \
            >"$console" 2>&1 </dev/null
    ) &
    nspawn=$!
    NSPAWN_PIDS+=("$nspawn")
    for _ in $(seq 60); do
        pid1="$(container_pid1 "$nspawn" systemd)" && break
        kill -0 "$nspawn" 2>/dev/null || die "systemd-nspawn exited: $(tail -20 "$console")"
        sleep 1
    done
    [ -n "$pid1" ] || die "no systemd inside $machine after 60 s: $(tail -20 "$console")"
    # Until the container's systemd has its bus up, systemctl answers nothing: ask again.
    for _ in $(seq 120); do
        state="$(inside_of "$pid1" timeout 120 systemctl is-system-running --wait 2>/dev/null || true)"
        [ -n "$state" ] && break
        sleep 1
    done
    case "$state" in
        running|degraded) log "$machine up ($state)";;
        *) die "$machine did not boot ($state): $(tail -20 "$console")";;
    esac
    [ "$state" = running ] || inside_of "$pid1" systemctl --failed --no-legend >&2 || true
    BOOTED=$pid1
}
# The block of README.md between "<!-- systemd-check: NAME begin" and "<!-- systemd-check: NAME end" (in a
# list item too), fences dropped, <this repository> made the worktree copy; into the file given.
readme_block() {  # name, file
    awk -v name="$1" '$0 ~ "<!-- systemd-check: " name " begin" { on = 1; next }
         $0 ~ "<!-- systemd-check: " name " end" { on = 0 } on && !/^ *```/' "$REPO/README.md" >"$2"
    [ -s "$2" ] || die "no $1 block between the systemd-check markers in README.md"
    grep -q '<this repository>' "$2" || die "the $1 block no longer clones <this repository>"
    sed -i "s|<this repository>|$SRC|" "$2"
}

# The daemon host gets the fixed uid/gid of the worker host's block (README "Many GPU hosts": "make the same
# change on the daemon host before its first systemd-sysusers"): its sed, on an override in /etc/sysusers.d.
WBLOCK="$CACHE/worker-block.sh"
readme_block worker "$WBLOCK"
sysusers_sed="$(sed -n "s|.*sed -i '\([^']*\)' /usr/lib/sysusers.d/heygem-daemon.conf.*|\1|p" "$WBLOCK")"
[ -n "$sysusers_sed" ] || die "the worker block no longer fixes the uid in /usr/lib/sysusers.d/heygem-daemon.conf"
mkdir -p "$ROOT/etc/sysusers.d"
sed "$sysusers_sed" "$REPO/systemd/heygem-daemon.sysusers.conf" >"$ROOT/etc/sysusers.d/heygem-daemon.conf"
boot "$ROOT" "$MACHINE" ""
CPID=$BOOTED
inside() { inside_of "$CPID" "$@"; }

# --- the README's install block, as written ---------------------------------------------------------------
BLOCK="$CACHE/install-block.sh"
readme_block install "$BLOCK"
cp "$BLOCK" "$ROOT/root/install-block.sh"

# PID 1 at debug level logs each sd_notify message it gets: that shows READY=1 arriving before "Started".
inside systemd-analyze log-level debug
log "running the README's install block"
if inside bash -euo pipefail -x /root/install-block.sh >&2; then
    pass "install-block"
else
    fail "install-block" "the README's install block failed (see above)"
    exit 1
fi
inside systemd-analyze log-level info

unit() { inside systemctl show heygem-daemon -p "$1" --value; }
journal() { inside journalctl -u heygem-daemon --no-pager -o cat "$@"; }
# grep -q on a pipe would end the writer early with SIGPIPE, which pipefail counts as a failure: read first.
contains() { grep -q -- "$2" <<<"$1"; }
journal_has() { contains "$(journal)" "$1"; }
pid1_journal() { inside journalctl --no-pager -o short-monotonic _PID=1; }
check_exposure() {  # check name, unit[, the container's runner]: `systemd-analyze security` says 2.0 or less
    local exposure
    exposure="$("${3:-inside}" systemd-analyze security --no-pager "$2" |
        sed -n "s/.*Overall exposure level for $2: \([0-9.]*\).*/\1/p")"
    if [ -n "$exposure" ] && awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }'; then
        pass "$1 ($exposure)"
    else
        fail "$1" "exposure '$exposure' (limit 2.0)"
    fi
}

# --- READY=1 before active, STATUS= ---------------------------------------------------------------------
pid1_text="$(pid1_journal)"
ready_line="$(grep -n 'heygem-daemon.service: Got notification message.*READY=1' <<<"$pid1_text" | sed -n 's/:.*//; 1p')"
started_line="$(grep -n 'Started heygem-daemon.service' <<<"$pid1_text" | sed -n 's/:.*//; 1p')"
if [ "$(unit ActiveState)" = active ] && [ -n "$ready_line" ] && [ -n "$started_line" ] &&
        [ "$ready_line" -lt "$started_line" ]; then
    pass "ready-before-active"
else
    fail "ready-before-active" "active=$(unit ActiveState) READY line=$ready_line Started line=$started_line"
fi
status="$(unit StatusText)"
if [[ "$status" == *queued*running* ]]; then pass "status"; else fail "status" "StatusText=$status"; fi

# --- a member of group heygem drops a pair; the video is made inside the sandbox --------------------------
PY=/opt/heygem-daemon/.venv/bin/python
inside useradd --create-home --groups heygem alice
inside sudo -u alice bash -c "cd /tmp && $PY -c 'import sys; sys.path.insert(0, \"/opt/heygem-daemon/tests\")
from pathlib import Path; from media_factory import write_speech_wav
write_speech_wav(Path(\"/tmp/hello.wav\"), 3.0); write_speech_wav(Path(\"/tmp/long.wav\"), 150.0)' &&
    cp /opt/heygem-daemon/tests/fixtures/portrait.jpg /srv/heygem/inbox/hello.jpg &&
    cp /tmp/hello.wav /srv/heygem/inbox/hello.wav"
probe_mp4() {  # path -> "seconds video audio" or nothing
    inside "$PY" -c 'import av, sys
with av.open(sys.argv[1]) as c:
    print(f"{c.duration / 1e6:.1f}", len(c.streams.video), len(c.streams.audio))' "$1" 2>/dev/null
}
if wait_until 180 "hello.mp4" inside test -s /srv/heygem/outputs/hello/hello.mp4 &&
        wait_until 60 "hello's links" inside test -s /srv/heygem/outputs/hello/links.json; then
    facts="$(probe_mp4 /srv/heygem/outputs/hello/hello.mp4)"
    if [[ "$facts" =~ ^[0-9.]+\ 1\ 1$ ]]; then
        pass "group-member-drop-and-job ($facts)"
    else
        fail "group-member-drop-and-job" "hello.mp4 probed as '$facts'"
    fi
else
    fail "group-member-drop-and-job" "$(journal | tail -20)"
fi
# The service needs no torch (preview engine): `make install` must not pull it in.
if inside "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is not None)'; then
    pass "no-torch"
else
    fail "no-torch" "torch is installed in /opt/heygem-daemon/.venv"
fi
# PID 1 logs these without the unit's name: look at the whole journal.
device_warnings="$(inside journalctl --no-pager -o cat | grep -E "(Couldn't stat device|Device allow list pattern).*nvidia" || true)"
if [ -z "$device_warnings" ]; then pass "no-device-warnings"
else fail "no-device-warnings" "$device_warnings"; fi

# --- DevicePolicy=closed is enforced here (not silently ignored): a device node opens only without it ------
open_tun() { inside systemd-run --quiet --wait --pipe "$@" sh -c 'exec 3<>/dev/net/tun' 2>/dev/null; }
if open_tun && ! open_tun -p DevicePolicy=closed; then
    pass "device-policy-enforced"
else
    open_tun && plain=opens || plain=fails
    open_tun -p DevicePolicy=closed && closed=opens || closed=fails
    fail "device-policy-enforced" "/dev/net/tun $plain without DevicePolicy=, $closed with DevicePolicy=closed"
fi

# --- reload applies; a broken config is refused and the old one keeps running ------------------------------
inside cp /etc/heygem/config.yaml /root/config.yaml.good
inside sed -i 's|^  settle_seconds: 3 |  settle_seconds: 2 |' /etc/heygem/config.yaml
inside systemctl reload heygem-daemon
if wait_until 20 "config reloaded" journal_has 'config reloaded'; then
    pass "reload"
else
    fail "reload" "$(journal | tail -5)"
fi
inside sh -c 'echo "watcher: {settle_secnds: 1}" >> /etc/heygem/config.yaml'
inside systemctl reload heygem-daemon
if wait_until 20 "config refused" journal_has 'new config refused' &&
        [ "$(unit ActiveState)" = active ]; then
    pass "reload-refuses-bad-config"
else
    fail "reload-refuses-bad-config" "$(unit ActiveState): $(journal | tail -5)"
fi
inside cp /root/config.yaml.good /etc/heygem/config.yaml
inside systemctl reload heygem-daemon

# --- journal priorities: the refusal is an error, "daemon ready" is not a warning -------------------------
if contains "$(journal -p err)" 'new config refused' && ! contains "$(journal -p warning)" 'daemon ready'; then
    pass "journal-priorities"
else
    fail "journal-priorities" "$(inside journalctl -u heygem-daemon --no-pager -o cat -p warning | tail -5)"
fi

# --- security exposure, online ---------------------------------------------------------------------------
check_exposure security-exposure heygem-daemon.service

# --- the watchdog kills a frozen daemon and systemd starts it again ----------------------------------------
old_pid="$(unit MainPID)"
inside kill -STOP "$old_pid"
restarted() {
    local pid; pid="$(unit MainPID)"
    [ "$pid" != 0 ] && [ "$pid" != "$old_pid" ] && [ "$(unit ActiveState)" = active ]
}
if wait_until 90 "a restart after the watchdog" restarted &&
        contains "$(pid1_journal)" 'heygem-daemon.service: Watchdog timeout'; then
    pass "watchdog-restart (NRestarts=$(unit NRestarts))"
else
    fail "watchdog-restart" "MainPID $(unit MainPID), $(unit ActiveState): $(pid1_journal | grep heygem | tail -5)"
fi

# --- a drained stop: the running task finishes, its delivery happens, exit 0 ------------------------------
inside sudo -u alice cp /opt/heygem-daemon/tests/fixtures/portrait.jpg /srv/heygem/inbox/long.jpg
inside sudo -u alice cp /tmp/long.wav /srv/heygem/inbox/long.wav
if wait_until 120 "the long task to start" journal_has 'task started.*task=long'; then
    inside systemctl stop heygem-daemon
    result="$(unit Result) $(unit ExecMainStatus)"
    log_text="$(journal)"
    if [ "$result" = "success 0" ] && grep -q 'draining' <<<"$log_text" &&
            grep -q 'task done.*task=long' <<<"$log_text" && grep -q 'batch reported.*job=long' <<<"$log_text" &&
            inside test -s /srv/heygem/outputs/long/links.json; then
        pass "drained-stop"
    else
        fail "drained-stop" "Result/ExecMainStatus '$result': $(tail -8 <<<"$log_text")"
    fi
else
    fail "drained-stop" "the long task never started: $(journal | tail -5)"
fi

# --- the other two units: a second (GPU) host from README "Many GPU hosts" as written, and the web console ----
# This container is the daemon host: Debian's redis-server with a password and appendonly (README "Broker"),
# the `remote` and `web` extras, the settings through the daemon's env file (HEYGEM_* overrides).
log "installing redis-server and the remote and web extras inside"
if inside bash -euo pipefail -c 'apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null
        cd /opt/heygem-daemon && .venv/bin/pip install -q ".[remote,web]"' >&2; then
    pass "extras-install"
else
    fail "extras-install" "see above"
    exit 1
fi
REDIS_PASSWORD="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
BROKER="redis://:$REDIS_PASSWORD@127.0.0.1:6379/0"
printf 'requirepass %s\nappendonly yes\n' "$REDIS_PASSWORD" >>"$ROOT/etc/redis/redis.conf"
inside systemctl restart redis-server
# Written from outside (the rootfs is a host folder); single quotes: systemd keeps the spaces inside.
# The daemon maps the paths it sends: the worker host's mount point (/mnt/heygem) is in its path_map too.
printf '%s\n' "HEYGEM_WORKERS__DEVICES='[]'" \
    "HEYGEM_WORKERS__REMOTE='{broker_url: \"$BROKER\", queues: {gpu: 2}, path_map: {/srv/heygem: /mnt/heygem}}'" \
    >>"$ROOT/etc/heygem/heygem-daemon.env"

# The worker host: a second container from the pristine rootfs, sharing the host's network (Redis on
# 127.0.0.1), the daemon's /srv/heygem bound in at /mnt/heygem (the README's "mounted elsewhere" case), the
# worktree copy to clone. Its block runs as written; at the two sudoedit lines the operator's edits are made
# by SUDO_EDITOR: this daemon's engine, a CPU device, the broker, the queue, the path map, the password.
cp -a --reflink=auto "$PRISTINE" "$WROOT"
mkdir -p "$WROOT$SRC" "$WROOT/mnt/heygem"
cp -a "$ROOT$SRC/." "$WROOT$SRC/"
pip_settings_into "$WROOT"
echo "HEYGEM_WORKERS__REMOTE__BROKER_URL=$BROKER" >"$WROOT/root/broker-url"
cat >"$WROOT/root/operator-edits.sh" <<'EDITS'
#!/bin/sh
# SUDO_EDITOR for the README's worker block (written by tests/system/systemd_check.sh): the operator's edits.
set -eu
case "$(head -1 "$1")" in
*/etc/heygem/config.yaml*)
    sed -i -e 's|^  name: heygem .*|  name: preview|' -e 's|^engines: {}.*|engines: {preview: {}}|' \
        -e 's|^  devices: .*|  devices: [cpu]|' -e 's|^    broker_url: .*|    broker_url: redis://127.0.0.1:6379/0|' \
        -e 's|^    queues: .*|    queues: {gpu: 2}|' -e 's|^    path_map: .*|    path_map: {/srv/heygem: /mnt/heygem}|' "$1"
    for line in '  name: preview$' 'engines: {preview: {}}$' '  devices: \[cpu\]$' '    broker_url: redis:' \
            '    queues: {gpu: 2}$' '    path_map: {/srv/heygem: /mnt/heygem}$'; do
        grep -q "^$line" "$1" || { echo "operator-edits: the example config has no line for '$line'" >&2; exit 1; }
    done;;
*/etc/heygem/heygem-worker.env*)
    cat /root/broker-url >>"$1";;
*)
    echo "operator-edits: an unexpected file to edit: $(head -1 "$1")" >&2; exit 1;;
esac
EDITS
chmod 0755 "$WROOT/root/operator-edits.sh"
cp "$WBLOCK" "$WROOT/root/worker-block.sh"
boot "$WROOT" heygem-gpu1 "$CGROUP_BELOW" --bind="$ROOT/srv/heygem:/mnt/heygem"
WPID=$BOOTED
on_worker() { inside_of "$WPID" "$@"; }
log "running the README's worker-host block on heygem-gpu1"
if on_worker env SUDO_EDITOR=/root/operator-edits.sh bash -euo pipefail -x /root/worker-block.sh >&2; then
    pass "worker-host-block"
else
    fail "worker-host-block" "the README's worker-host block failed (see above)"
    exit 1
fi
# "the same numeric uid/gid on every host": files on the share have one owner.
ids="$(inside id -u heygem):$(inside id -g heygem) $(on_worker id -u heygem):$(on_worker id -g heygem)"
if [ "$ids" = "990:990 990:990" ]; then pass "fixed-uid-gid"; else fail "fixed-uid-gid" "daemon host, worker host: $ids"; fi
wunit() { on_worker systemctl show heygem-worker -p "$1" --value; }
wjournal() { on_worker journalctl -u heygem-worker --no-pager -o cat; }
worker_says() { contains "$(wjournal)" "$1"; }
if wait_until 60 "the worker to be ready" worker_says 'ready\.' && [ "$(wunit ActiveState)" = active ] &&
        contains "$(wunit DropInPaths)" heygem-worker.service.d/share.conf; then
    pass "worker-host-ready ($(wunit ActiveState), drop-in $(wunit DropInPaths))"
else
    fail "worker-host-ready" "$(wunit ActiveState), drop-ins '$(wunit DropInPaths)': $(wjournal | tail -15)"
fi
inside systemctl start heygem-daemon
inside sudo -u alice cp /opt/heygem-daemon/tests/fixtures/portrait.jpg /srv/heygem/inbox/remote1.jpg
# A voice of its own: the same pair as hello would be a duplicate drop, not generated again.
inside sudo -u alice bash -c "cd /tmp && $PY -c 'import sys; sys.path.insert(0, \"/opt/heygem-daemon/tests\")
from pathlib import Path; from media_factory import write_speech_wav
write_speech_wav(Path(\"/tmp/remote1.wav\"), 2.0)' && cp /tmp/remote1.wav /srv/heygem/inbox/remote1.wav"
if wait_until 180 "remote1.mp4" inside test -s /srv/heygem/outputs/remote1/remote1.mp4 &&
        wait_until 30 "the worker's report" worker_says 'succeeded in' &&
        journal_has 'task sent to a remote queue.*task=remote1'; then
    pass "worker-host-renders ($(probe_mp4 /srv/heygem/outputs/remote1/remote1.mp4))"
else
    fail "worker-host-renders" "daemon: $(journal | tail -5) worker: $(wjournal | tail -8)"
fi
check_exposure worker-security-exposure heygem-worker.service on_worker
on_worker systemctl stop heygem-worker
if [ "$(wunit Result)" = success ]; then
    pass "worker-clean-stop"
else
    fail "worker-clean-stop" "$(wunit Result): $(wjournal | tail -5)"
fi

inside install -m 0644 /opt/heygem-daemon/systemd/heygem-web.service /etc/systemd/system/
inside systemctl daemon-reload

# The web console: a user from web.users logs in and sees the jobs the daemon made.
hash="$(inside sh -c 'echo "s3cret-pass" | /opt/heygem-daemon/.venv/bin/heygem-daemon web hash-password')"
inside /opt/heygem-daemon/.venv/bin/python - "$hash" <<'PY'
import sys, yaml
path = "/etc/heygem/config.yaml"
with open(path) as fh:
    cfg = yaml.safe_load(fh)
cfg["web"] = {**cfg.get("web", {}), "enabled": True, "users": {"alice": sys.argv[1]}}
with open(path, "w") as fh:
    yaml.safe_dump(cfg, fh)
PY
inside sh -c 'head -c 32 /dev/urandom | base64 | install -m 0600 /dev/stdin /etc/heygem/credentials/web-session-key'
inside systemctl enable --now heygem-web
cat >"$ROOT/root/web_login.py" <<'PY'
"""Log in to the console as a browser would (cookie, CSRF token from the form) and print the jobs page."""
import http.cookiejar, re, sys, time, urllib.parse, urllib.request
opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
base = "http://127.0.0.1:8470"
for _ in range(60):
    try:
        form = opener.open(base + "/login", timeout=5).read().decode()
        break
    except OSError:
        time.sleep(1)
else:
    sys.exit("the console never answered on 127.0.0.1:8470")
csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
body = urllib.parse.urlencode({"user": "alice", "password": "s3cret-pass", "csrf": csrf}).encode()
page = opener.open(base + "/login", data=body, timeout=10)
print(page.geturl())
print(page.read().decode())
PY
web_page="$(inside /opt/heygem-daemon/.venv/bin/python /root/web_login.py 2>&1 || true)"
if [[ "$(head -1 <<<"$web_page")" == */jobs ]] && contains "$web_page" 'remote1' && contains "$web_page" 'hello'; then
    pass "web-unit-login-and-jobs"
else
    fail "web-unit-login-and-jobs" "$(tail -c 600 <<<"$web_page") $(inside journalctl -u heygem-web --no-pager -o cat | tail -5)"
fi
check_exposure web-security-exposure heygem-web.service
