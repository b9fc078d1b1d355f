#!/usr/bin/env bash
# Check Sandrun's userland on Ubuntu 24.04 (noble): install.sh as on a fresh host, with nothing
# but Ubuntu's own packages, then `sandrun serve` and a job in each interpreter install.sh
# installed, then tests.  As root, from the project's root:
#
#   bash ./scripts/ubuntu-check.sh                      unit tests and a few integration tests
#   bash ./scripts/ubuntu-check.sh -- tests/unit tests/integration/test_tls.py
#
# The Ubuntu root filesystem is made once with mmdebstrap (variant minbase and apt, main and
# universe) in $SR_UBUNTU_ROOT (default /var/tmp/sr-ubuntu; delete it for a fresh one) from
# $SR_UBUNTU_MIRROR (default http://archive.ubuntu.com/ubuntu), checked with Ubuntu's archive
# key: $SR_UBUNTU_KEYRING, else the ubuntu-keyring package's, else the key in that package as
# the mirror has it (its checksum from the mirror's package list: as trusted as the mirror).  The checkout (tracked
# and untracked files, without .git) is copied to /root/sandrun in it, and the check runs
# there in a mount namespace of its own that pivot_root makes its root (not a chroot: the
# sandbox's user namespaces are refused inside one), with the host's /sys and /dev, a fresh
# /proc and the host's network, so that apt and pip reach their archives.  Every mount is
# private to that namespace and goes with it: nothing is left mounted on the host.  Where PyPI
# is reached through a TLS-intercepting proxy, pip in the root is given the CA bundle
# $SR_UBUNTU_PIP_CERT (default: $PIP_CERT, if set) as PIP_CERT; nothing else of the host's.
#
# What it checks is the userland: Ubuntu's package names, python3.12, PEP 668, its node,
# ruby, php, R.  The kernel and its cgroups are the host's (cgroup v1 or v2), not Ubuntu's.
# The "== RESULT" lines and pytest's summary go to docs/ubuntu-check.md; the full log to
# $SR_UBUNTU_LOGS (default /tmp/sandrun-ubuntu).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${SR_UBUNTU_ROOT:-/var/tmp/sr-ubuntu}
MIRROR=${SR_UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}
LOGS=${SR_UBUNTU_LOGS:-/tmp/sandrun-ubuntu}
PIP_CA=${SR_UBUNTU_PIP_CERT:-${PIP_CERT:-}}
DEFAULT_TESTS=(tests/unit tests/integration/test_sandbox_interpreters.py
               tests/integration/test_sandbox_setup.py tests/integration/test_worker_run.py
               tests/integration/test_readme.py)

if [ "${1:-}" = --inside ]; then
    # In the Ubuntu root, as root, in /root/sandrun: the guest side.
    shift
    set +e
    URL=http://127.0.0.1:8443
    export DEBIAN_FRONTEND=noninteractive
    . /etc/os-release
    echo "== RESULT host: $PRETTY_NAME, kernel $(uname -r) (the host's), cgroup" \
         "$(stat -fc %T /sys/fs/cgroup | sed 's/^tmpfs$/v1/; s/^cgroup2fs$/v2/') (the host's);" \
         "before install.sh: python3" \
         "$(command -v python3 || echo none), pip $(command -v pip3 || echo none)"
    bash ./scripts/install.sh 2>&1
    rc=$?
    echo "== RESULT install.sh exited $rc"
    [ $rc = 0 ] || exit $rc
    echo "== RESULT python3 $(python3 -c 'import platform; print(platform.python_version())');" \
         "PEP 668: $(ls /usr/lib/python3*/EXTERNALLY-MANAGED 2>/dev/null || echo none);" \
         "venv python $(/opt/sandrun/bin/python -c 'import sys; print(sys.version.split()[0])')"
    echo "== RESULT sandrun on the PATH: $(command -v sandrun) ($(sandrun --version))"
    sandrun serve > /tmp/serve.log 2>&1 &
    worker=$!
    for _ in $(seq 120); do curl -sf "$URL/health" >/dev/null && break; sleep 1; done
    run() {  # run <file name> <source>: POST /run, prints the reason and stdout
        local body
        body=$(python3 -c 'import json, sys; print(json.dumps({"files": {sys.argv[1]: sys.argv[2]}}))' "$1" "$2")
        curl -s -X POST "$URL/run?keep=0" -H 'Content-Type: application/json' -d "$body" \
            | python3 -c 'import json, sys; r = json.load(sys.stdin)
print(r.get("status"), r.get("execution_metadata", {}).get("reason"), repr(r.get("stdout")),
      repr(r.get("stderr", r.get("error", ""))[-200:]))'
    }
    echo "== RESULT job main.py: $(run main.py 'print(6 * 7)')"
    echo "== RESULT job main.py, its /etc/python3.X: $(run main.py 'import os, sys
print(os.listdir(f"/etc/python3.{sys.version_info[1]}"))')"
    declare -A jobs=(
        [main.js]='console.log(6 * 7)' [main.rb]='puts 6 * 7' [main.pl]='print 6 * 7, "\n";'
        [main.php]='<?php echo 6 * 7, "\n";' [main.R]='cat(6 * 7, "\n")' [main.sh]='echo $((6 * 7))'
    )
    declare -A needs=([main.js]=node [main.rb]=ruby [main.pl]=perl [main.php]=php
                      [main.R]=Rscript [main.sh]=bash)
    for name in main.js main.rb main.pl main.php main.R main.sh; do
        if command -v "${needs[$name]}" >/dev/null; then
            echo "== RESULT job $name (${needs[$name]} $("${needs[$name]}" --version 2>&1 \
                | grep -om1 '[0-9]\+\.[0-9]\+\.[0-9]\+')): $(run "$name" "${jobs[$name]}")"
        else
            echo "== RESULT job $name: ${needs[$name]} not installed"
        fi
    done
    kill -TERM "$worker" 2>/dev/null
    wait "$worker"
    echo "== RESULT serve exited $? on SIGTERM"
    echo "== RESULT tests: bash ./scripts/test.sh $*"
    exec bash ./scripts/test.sh "$@"
fi

[ "$(id -u)" = 0 ] || { echo "ubuntu-check.sh must run as root" >&2; exit 1; }
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || set -- "${DEFAULT_TESTS[@]}"
mkdir -p "$LOGS"
log=$LOGS/ubuntu.log

if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
    keyring=${SR_UBUNTU_KEYRING:-/usr/share/keyrings/ubuntu-archive-keyring.gpg}
    if [ ! -f "$keyring" ]; then
        # ubuntu-keyring as the mirror has it, checked against the mirror's package list.
        work=$(mktemp -d /var/tmp/sr-ubuntu-keyring-XXXXXX)
        chmod 755 "$work"     # apt reads the key as its own user
        trap 'rm -rf "$work"' EXIT
        entry=$(curl -sf "$MIRROR/dists/noble/main/binary-amd64/Packages.gz" | zcat \
            | awk '/^Package:/ {p = $2 == "ubuntu-keyring"} p && /^(Filename|SHA256):/ {print $2}')
        read -r file sha <<< "$(echo $entry)"
        curl -sf -o "$work/keyring.deb" "$MIRROR/$file"
        echo "$sha  $work/keyring.deb" | sha256sum -c --quiet
        dpkg-deb -x "$work/keyring.deb" "$work/x"
        keyring=$work/x/usr/share/keyrings/ubuntu-archive-keyring.gpg
    fi
    echo "== making the Ubuntu 24.04 root in $ROOT"
    mmdebstrap --variant=minbase --include=apt --components=main,universe --keyring="$keyring" \
        noble "$ROOT" \
        "deb $MIRROR noble main universe" "deb $MIRROR noble-updates main universe" \
        "deb $MIRROR noble-security main universe" \
        || { echo "mmdebstrap failed: remove $ROOT before trying again" >&2; exit 1; }
fi

# The checkout, fresh each time (install.sh and the tests run from it).
rm -rf "$ROOT/root/sandrun"
mkdir -p "$ROOT/root/sandrun"
git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - | tar -xf - -C "$ROOT/root/sandrun"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
pip_env=()
if [ -n "$PIP_CA" ]; then
    cp "$PIP_CA" "$ROOT/root/pip-ca.crt"
    pip_env=(PIP_CERT=/root/pip-ca.crt)
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
[ -z "$(git status --porcelain -- . ':!docs/ubuntu-check.md' 2>/dev/null)" ] || commit="$commit with uncommitted changes"

echo "== check in $ROOT; log in $log"
start=$SECONDS
set +e
# The namespace's mounts: the root bound onto itself, /proc fresh (the sandbox mounts a /proc
# of its own, which the kernel allows only where a whole one is visible), /sys and /dev from
# the host, /run a tmpfs and /tmp on disk (as Ubuntu 24.04 has them); then pivot_root, and the
# host's tree unmounted.
unshare --mount --propagation private -- env -i ROOT="$ROOT" "${pip_env[@]}" bash -c '
    set -e
    mount --bind "$ROOT" "$ROOT"
    mount -t proc proc "$ROOT/proc"
    mount --rbind /sys "$ROOT/sys"
    mount --rbind /dev "$ROOT/dev"
    mount -t tmpfs tmpfs "$ROOT/run"
    mkdir -p "$ROOT/.host"
    cd "$ROOT"
    pivot_root . .host
    umount -l /.host
    rmdir /.host
    cd /root/sandrun
    exec env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 TERM=dumb ${PIP_CERT:+PIP_CERT=$PIP_CERT} bash ./scripts/ubuntu-check.sh --inside "$@"
' ubuntu-check "$@" > "$log" 2>&1
rc=$?
set -e
{
    echo "# Sandrun on Ubuntu 24.04 (userland check)"
    echo
    echo "Made by \`scripts/ubuntu-check.sh -- $*\` on $(date -u +%Y-%m-%dT%H:%MZ) from commit" \
         "$commit, in an Ubuntu 24.04 root (mmdebstrap minbase and apt, main and universe, from" \
         "$MIRROR) entered with pivot_root: install.sh ran as on a fresh host, with Ubuntu's" \
         "packages only${PIP_CA:+ (pip given the CA bundle $PIP_CA, how this network reaches PyPI)}." \
         "The kernel is the host's ($(uname -r), cgroup" \
         "$(stat -fc %T /sys/fs/cgroup | sed 's/^tmpfs$/v1/; s/^cgroup2fs$/v2/')): this" \
         "checks Ubuntu's userland, not its kernel or cgroup v2. Exited $rc after" \
         "$(( (SECONDS - start) / 60 )) min."
    echo
    echo '```'
    grep -E '^== RESULT|^install.sh:|^sandrun installed|^tests capped' "$log" \
        | sed 's/^== RESULT //' || true
    grep -E '^(FAILED|ERROR) |^=+ .*(passed|failed|error).* =+$|[0-9]+ (passed|failed)' "$log" \
        | tail -40 || true
    tail -1 "$log" | grep -vE '^== RESULT|[0-9]+ (passed|failed)' || true
    echo '```'
} > docs/ubuntu-check.md
echo "== summary in docs/ubuntu-check.md (exit $rc)"
exit $rc
