#!/usr/bin/env bash
# Install Sandrun and what its sandbox and tests need, as root, on Debian 12 or Ubuntu 24.04
# (any Debian-like host with apt; others: install the packages below by hand first).
#
#   bash ./scripts/install.sh            the packages, then Sandrun in its own virtual
#                                        environment ($SANDRUN_PREFIX, default /opt/sandrun)
#                                        with sandrun, sandrun-coordinator and sandrun-mcp
#                                        linked into /usr/local/bin
#   bash ./scripts/install.sh --service  the same, then the systemd unit (see the README)
#   bash ./scripts/install.sh --worker-only   without what only the tests need (containers)
#
# Idempotent: safe to run again (an existing environment is reused and updated).  The
# environment is made from the python3 on the PATH ($PYTHON to choose another): Debian's
# own, which refuses system-wide pip installs (PEP 668), or any other 3.11+.  Sandrun is
# installed editable: the environment runs this checkout's code.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "install.sh must run as root (the worker creates namespaces, cgroups and mounts)" >&2
    exit 1
fi
service=0
tests=1
for arg in "$@"; do
    case $arg in
        --service) service=1 ;;
        --worker-only) tests=0 ;;
        *) echo "usage: install.sh [--service] [--worker-only]" >&2; exit 2 ;;
    esac
done
PREFIX=${SANDRUN_PREFIX:-/opt/sandrun}
PYTHON=${PYTHON:-python3}

export DEBIAN_FRONTEND=noninteractive
# What the worker needs.
packages=(
    libseccomp2        # seccomp filters (loaded through pyseccomp)
    python3 python3-venv bash perl   # job interpreters; python3-venv for Sandrun's own venv
    ruby php-cli r-base-core
    curl tar gzip ca-certificates
)
command -v node >/dev/null 2>&1 || packages+=(nodejs)
# What only the tests and benchmarks need.
test_packages=(
    iproute2 procps    # ip, ps: used by tests to check for leftovers
    bubblewrap         # reference sandbox for the launch benchmark
    gcc libc6-dev      # tests compile small C probes (raw syscalls, setuid, static binaries)
    chromium chromium-driver   # the web page's browser test (headless, driven by Selenium)
)
[ $tests = 1 ] || test_packages=()
# Wanted, but Sandrun runs without them (a note is printed if apt cannot get them).
optional_packages=()
# Debian's nodejs comes without npm, which fetches package.json dependencies of jobs.
command -v npm >/dev/null 2>&1 || optional_packages+=(npm)

missing_of() {
    local p
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || printf '%s\n' "$p"
    done
}
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: no apt-get here; install these packages by hand:" \
         "${packages[*]} ${test_packages[*]} ${optional_packages[*]}" >&2
else
    mapfile -t missing < <(missing_of "${packages[@]}")
    mapfile -t missing_tests < <(missing_of "${test_packages[@]}")
    mapfile -t missing_optional < <(missing_of "${optional_packages[@]}")
    if [ $(( ${#missing[@]} + ${#missing_tests[@]} + ${#missing_optional[@]} )) -gt 0 ]; then
        apt-get update -qq || echo "install.sh: apt-get update failed; trying what apt has" >&2
    fi
    # The worker's packages must install; without the others install.sh goes on and says so
    # (each list in one apt-get call, then one by one, so that one missing package costs
    # only itself).
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    without() {  # without <list> <package> <why>: says what goes on without it
        echo "install.sh: $3 $2; going on without it:" \
             "$( [ "$1" = missing_tests ] && echo "tests that need it will fail or be skipped" \
                 || echo "jobs that need it (npm: package.json requirements) will fail")" >&2
    }
    for list in missing_tests missing_optional; do
        declare -n wanted=$list
        # A name that apt has only as another package's Provides is left out: Ubuntu's
        # chromium and chromium-driver come from chromium-browser and chromium-chromedriver,
        # which install the snap through snapd (nothing at all in a container), not the
        # /usr/bin/chromium the tests look for.
        real=()
        for p in "${wanted[@]}"; do
            if [ -n "$(apt-cache show --no-all-versions "$p" 2>/dev/null)" ]; then
                real+=("$p")
            else
                without $list "$p" "apt has no package (or only a virtual one) named"
            fi
        done
        [ ${#real[@]} -gt 0 ] || continue
        apt-get install -y -qq --no-install-recommends "${real[@]}" 2>/dev/null && continue
        for p in "${real[@]}"; do
            apt-get install -y -qq --no-install-recommends "$p" >/dev/null 2>&1 \
                || without $list "$p" "could not install"
        done
    done
fi

# Sandrun in a virtual environment of its own.
if [ ! -x "$PREFIX/bin/python" ]; then
    "$PYTHON" -m venv "$PREFIX"
fi
if [ $tests = 1 ]; then
    "$PREFIX/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
else
    "$PREFIX/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir .
fi
commands=(sandrun sandrun-coordinator)
# The MCP server needs the mcp package, which --worker-only leaves out.
if "$PREFIX/bin/python" -c 'import mcp' 2>/dev/null; then
    commands+=(sandrun-mcp)
else
    rm -f /usr/local/bin/sandrun-mcp
fi
for command in "${commands[@]}"; do
    ln -sfn "$PREFIX/bin/$command" "/usr/local/bin/$command"
done
echo "sandrun installed in $PREFIX: $("$PREFIX/bin/sandrun" --version); on the PATH as" \
     "$(command -v sandrun || echo /usr/local/bin/sandrun)"

if [ $service = 1 ]; then
    "$PREFIX/bin/sandrun" install-service
fi
