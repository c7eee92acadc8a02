#!/usr/bin/env bash
# The Debian packages the test suite starts or drives, installed when missing (as root; otherwise it says
# what to install and the tests that need them fail or skip with the same words). Run by `make test`.
set -euo pipefail
# command that shows the package is there = Debian packages that provide it
NEEDS=(
    "systemd-analyze=systemd"                       # unit-file tests (verify, security --offline)
    "chromedriver=chromium chromium-driver"         # the web console's browser test
    "redis-server=redis-server"                     # the remote-worker tests' broker
    "nginx=nginx"                                   # the web console behind the README's nginx block
    "smbd=samba"                                    # intake: an SMB upload that pauses (tests/smb_server.py)
    "espeak-ng=espeak-ng"                           # scripts: the offline speech engine (speech.engine: espeak)
)
missing=()
for need in "${NEEDS[@]}"; do
    command -v "${need%%=*}" >/dev/null 2>&1 || missing+=(${need#*=})
done
# the pausing SMB client (tests/tools/smb_upload.py) runs on the system Python with Samba's client library
/usr/bin/python3 -c 'import smbc' >/dev/null 2>&1 || missing+=(python3-smbc)
[ ${#missing[@]} = 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing test packages: ${missing[*]}" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
else
    echo "missing test packages (install them as root: apt-get install ${missing[*]})" >&2
fi
