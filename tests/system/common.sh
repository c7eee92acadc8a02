# Sourced by systemd_check.sh and image_check.sh: the PASS/FAIL log, the host's apt mirror, and the cgroups
# systemd-nspawn leaves behind on a host whose PID 1 is not systemd.
# shellcheck shell=bash
# The caller sets CHECK (its name in log lines and its make target), CACHE and START=$SECONDS.
PASSED=()
FAILED=()

log() { printf '[%s %4ds] %s\n' "$CHECK" "$((SECONDS - START))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
pass() { PASSED+=("$1"); log "PASS $1"; }
fail() { FAILED+=("$1"); log "FAIL $1${2:+: $2}"; }

# The first mirror URI the host's apt configuration uses for $SUITE (deb822 .sources or one-line .list).
host_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function flush() { if (uri != "" && has) print uri; uri = ""; has = 0 }
            /^[ \t]*$/ { flush(); next }
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) has = 1 }
            END { flush() }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # "deb [options] URI suite components": the URI is the field before the suite.
        awk -v suite="$SUITE" '$1 == "deb" { for (i = 3; i <= NF; i++) if ($i == suite) { print $(i-1); break } }' "$f"
    done
}

# With --keep-unit and no systemd on the host, nspawn leaves its (empty) cgroups below our own (payload/,
# supervisor/) and its state in /run/systemd/nspawn.
own_cgroups() {  # "mount point  our path" for the unified and the name=systemd hierarchies
    local v2 v1
    v2="$(awk -F: '$1 == 0 { print $3 }' /proc/self/cgroup)"
    v1="$(awk -F: '$2 == "name=systemd" { print $3 }' /proc/self/cgroup)"
    [ -z "$v2" ] || findmnt -rn -t cgroup2 -o TARGET | sed "s|\$| $v2|"
    [ -z "$v1" ] || findmnt -rn -t cgroup -o TARGET,OPTIONS | awk -v p="$v1" '/name=systemd/ { print $1, p }'
}
nspawn_leftovers_remove() {
    local mount own dir
    while read -r mount own; do
        for dir in "$mount${own%/}/payload" "$mount${own%/}/supervisor"; do
            # A cgroup the kernel has not emptied yet stays: harmless, and gone by the next run.
            [ ! -d "$dir" ] || find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
        done
    done < <(own_cgroups)
    rm -rf /run/systemd/nspawn
}
container_pid1() {  # nspawn's pid, the command name of the container's PID 1 -> its pid on the host
    local child
    for child in $(pgrep -P "$1" 2>/dev/null) $(pgrep -P "$(pgrep -d, -P "$1" 2>/dev/null || echo 0)" 2>/dev/null); do
        [ "$(cat "/proc/$child/comm" 2>/dev/null)" = "$2" ] && { echo "$child"; return 0; }
    done
    return 1
}

# Root on a Debian/Ubuntu host, $CACHE locked for this run (fd 9), the tools ("command:package" each)
# installed, SUITE and MIRROR: the host's release and the apt mirror it comes from.
check_begin() {
    [ "$(id -u)" = 0 ] || die "run as root (sudo make $CHECK)"
    command -v apt-get >/dev/null || die "needs a Debian/Ubuntu host (apt-get)"
    mkdir -p "$CACHE"
    exec 9>"$CACHE/lock"
    flock -n 9 || die "another $CHECK is using $CACHE"
    local tool missing=()
    for tool in "$@"; do command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}"); done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
    fi
    . /etc/os-release
    SUITE="${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"
    MIRROR="$(host_mirror | sed -n 1p)"
    [ -n "$MIRROR" ] || die "no apt mirror for $SUITE in /etc/apt/sources.list*"
}

wait_until() {  # seconds, description, command...
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        [ $SECONDS -lt $deadline ] || { log "timed out after ${seconds}s waiting for $what"; return 1; }
        sleep 1
    done
}
