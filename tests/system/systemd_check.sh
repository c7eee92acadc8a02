#!/usr/bin/env bash
# The unit under a real systemd: boots a minimal Debian/Ubuntu container (systemd-nspawn --boot), replays
# the README's "Install as a service" block cut out of README.md (between the systemd-check-install
# markers, so the docs cannot drift), and checks what the unit promises. Run as root on a Debian/Ubuntu
# host: `sudo make systemd-check`. Works on a host whose PID 1 is not systemd (CI containers).
#
# Environment:
#   SYSTEMD_CHECK_CACHE  folder kept between runs: the pristine rootfs and pip's cache
#                        (default /var/cache/heygem-systemd-check; delete it to rebuild)
#   SYSTEMD_CHECK_KEEP=1 leave the container's rootfs in place after the run (for a look around)
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
NSPAWN_PID=
CPID=
rm -rf "$ROOT"
cp -a --reflink=auto "$PRISTINE" "$ROOT"
echo "$MACHINE" >"$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$MACHINE" >"$ROOT/etc/hosts"  # as the Debian installer writes
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
for conf in /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
    [ -f "$conf" ] || continue
    dest="$ROOT${conf/#$HOME//root}"
    mkdir -p "$(dirname "$dest")"
    cp "$conf" "$dest"
done
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
    if [ -d "$path" ]; then
        BINDS+=(--bind-ro="$path")
    elif [ -f "$path" ]; then
        mkdir -p "$ROOT$(dirname "$path")"
        cp "$path" "$ROOT$path"
    fi
done <"$CACHE/pip-paths"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
fi

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
# register with, so --register=no --keep-unit, and commands go in with nsenter.
poweroff() {
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        log "powering the container off"
        kill -TERM "$NSPAWN_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL "$NSPAWN_PID" 2>/dev/null || true
        wait "$NSPAWN_PID" 2>/dev/null || true
    fi
    nspawn_leftovers_remove
    if [ "${SYSTEMD_CHECK_KEEP:-0}" != 1 ]; then rm -rf "$ROOT"; fi
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

CONSOLE="$CACHE/console.log"
log "booting $SUITE with systemd-nspawn (console: $CONSOLE)"
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 setsid systemd-nspawn --boot --directory="$ROOT" --machine="$MACHINE" \
    --register=no --keep-unit --system-call-filter=bpf --console=read-only "${BINDS[@]}" \
    >"$CONSOLE" 2>&1 </dev/null &
NSPAWN_PID=$!

for _ in $(seq 60); do
    CPID="$(container_pid1 "$NSPAWN_PID" systemd)" && break
    kill -0 "$NSPAWN_PID" 2>/dev/null || die "systemd-nspawn exited: $(tail -20 "$CONSOLE")"
    sleep 1
done
[ -n "$CPID" ] || die "no systemd inside the container after 60 s: $(tail -20 "$CONSOLE")"

inside() {
    nsenter -t "$CPID" -a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0 "${PIP_ENV[@]}" "$@"
}
# Until the container's systemd has its bus up, systemctl answers nothing: ask again.
state=
for _ in $(seq 120); do
    state="$(inside timeout 120 systemctl is-system-running --wait 2>/dev/null || true)"
    [ -n "$state" ] && break
    sleep 1
done
case "$state" in
    running|degraded) log "container up ($state)";;
    *) die "container did not boot ($state): $(tail -20 "$CONSOLE")";;
esac
[ "$state" = running ] || inside systemctl --failed --no-legend >&2 || true

# --- the README's install block, as written ---------------------------------------------------------------
BLOCK="$CACHE/install-block.sh"
awk '/<!-- systemd-check: install begin/ { on = 1; next } /<!-- systemd-check: install end/ { on = 0 }
     on && !/^```/' "$REPO/README.md" >"$BLOCK"
[ -s "$BLOCK" ] || die "no install block between the systemd-check markers in README.md"
grep -q '<this repository>' "$BLOCK" || die "the install block no longer clones <this repository>"
sed -i "s|<this repository>|$SRC|" "$BLOCK"
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
check_exposure() {  # check name, unit: `systemd-analyze security` says 2.0 or less
    local exposure
    exposure="$(inside systemd-analyze security --no-pager "$2" |
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

# --- the other two units: a remote worker rendering through a real Redis, and the web console ---------------
# Both on this one box: Debian's redis-server, the `remote` and `web` extras as README "Many GPU hosts"
# and "Web console" install them, the settings through each unit's env file (HEYGEM_* overrides).
log "installing redis-server and the remote and web extras inside"
if inside bash -euo pipefail -c 'apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null
        cd /opt/heygem-daemon && .venv/bin/pip install -q ".[remote,web]"' >&2; then
    pass "extras-install"
else
    fail "extras-install" "see above"
    exit 1
fi
# Written from outside (the rootfs is a host folder); single quotes: systemd keeps the spaces inside.
REMOTE="'{broker_url: redis://127.0.0.1:6379/0, queues: {gpu: 2}}'"
printf '%s\n' "HEYGEM_WORKERS__DEVICES='[]'" "HEYGEM_WORKERS__REMOTE=$REMOTE" >>"$ROOT/etc/heygem/heygem-daemon.env"
printf '%s\n' "HEYGEM_WORKERS__DEVICES='[cpu]'" "HEYGEM_WORKERS__REMOTE=$REMOTE" >"$ROOT/etc/heygem/heygem-worker.env"
chmod 0600 "$ROOT/etc/heygem/heygem-worker.env"
inside install -m 0644 /opt/heygem-daemon/systemd/heygem-worker.service /opt/heygem-daemon/systemd/heygem-web.service \
    /etc/systemd/system/
inside systemctl daemon-reload
wjournal() { inside journalctl -u heygem-worker --no-pager -o cat; }
worker_says() { contains "$(wjournal)" "$1"; }
inside systemctl enable --now heygem-worker
inside systemctl start heygem-daemon
if wait_until 60 "the worker to be ready" worker_says 'ready\.'; then
    inside sudo -u alice cp /opt/heygem-daemon/tests/fixtures/portrait.jpg /srv/heygem/inbox/remote1.jpg
    # A voice of its own: the same pair as hello would be a duplicate drop, not generated again.
    inside sudo -u alice bash -c "cd /tmp && $PY -c 'import sys; sys.path.insert(0, \"/opt/heygem-daemon/tests\")
from pathlib import Path; from media_factory import write_speech_wav
write_speech_wav(Path(\"/tmp/remote1.wav\"), 2.0)' && cp /tmp/remote1.wav /srv/heygem/inbox/remote1.wav"
    if wait_until 180 "remote1.mp4" inside test -s /srv/heygem/outputs/remote1/remote1.mp4 &&
            wait_until 30 "the worker's report" worker_says 'succeeded in' &&
            journal_has 'task sent to a remote queue.*task=remote1'; then
        pass "worker-unit-renders ($(probe_mp4 /srv/heygem/outputs/remote1/remote1.mp4))"
    else
        fail "worker-unit-renders" "daemon: $(journal | tail -5) worker: $(wjournal | tail -8)"
    fi
else
    fail "worker-unit-renders" "the worker never became ready: $(wjournal | tail -15)"
fi
check_exposure worker-security-exposure heygem-worker.service
inside systemctl stop heygem-worker
if [ "$(inside systemctl show heygem-worker -p Result --value)" = success ]; then
    pass "worker-clean-stop"
else
    fail "worker-clean-stop" "$(inside systemctl show heygem-worker -p Result --value): $(wjournal | tail -5)"
fi

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
