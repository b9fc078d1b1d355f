#!/usr/bin/env bash
# Install Sandrun and what its sandbox and tests need on Debian 12, as root.
# Idempotent: safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "install.sh must run as root (the worker creates namespaces, cgroups and mounts)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
packages=(
    libseccomp2        # seccomp filters (loaded through pyseccomp)
    iproute2 procps    # ip, ps: used by tests to check for leftovers
    bubblewrap         # reference sandbox for the launch benchmark
    gcc libc6-dev      # tests compile small C probes (raw syscalls, setuid, static binaries)
    python3 bash perl  # job interpreters
    ruby php-cli r-base-core
    curl tar gzip
)
command -v node >/dev/null 2>&1 || packages+=(nodejs)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]"
echo "sandrun installed: $("$PYTHON" -m sandrun --version)"
