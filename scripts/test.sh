#!/usr/bin/env bash
# Run Sandrun's test suite as root, inside an outer cgroup cap, so that a
# broken sandbox fails a test instead of taking the machine down.
#
# cgroup v1: the cap is made beneath the cgroups we were started in.
# cgroup v2: a cgroup that holds processes may not give its children limits,
# so the cap needs a cgroup of our own: the root cgroup, or one we are alone in
# (a Delegate=yes scope or service, a container), where the shell first moves
# into a leaf.  From a login session's scope the script re-runs itself in a
# Delegate=yes scope of its own (systemd-run --scope).  Layout on v2:
#   <ours>/sandrun-tests-<pid>/          memory.max, pids.max (the cap)
#   <ours>/sandrun-tests-<pid>/runner/   pytest alone (this shell stays outside)
# so that a sandbox the tests start can treat runner/ as its own delegated cgroup, and
# the integration tests make their own capped cgroup beside runner/.
set -euo pipefail
cd "$(dirname "$0")/.."
# The Python install.sh set up (its own venv), else the one on the PATH.
VENV=${SANDRUN_PREFIX:-/opt/sandrun}
if [ -z "${PYTHON:-}" ]; then
    # (a venv made with --worker-only has no pytest: then the PATH's)
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import pytest' 2>/dev/null; then
        PYTHON=$VENV/bin/python
    else
        PYTHON=python3
    fi
fi
# pytest's temporary directories of this run alone: by default every run on the host
# shares /tmp/pytest-of-root and keeps only the last three, deleting other runs'.
basetemp=$(mktemp -d "${TMPDIR:-/tmp}/sandrun-pytest-XXXXXX")
MEMORY_CAP=${SANDRUN_TEST_MEMORY:-$((8 * 1024 * 1024 * 1024))}
PIDS_CAP=${SANDRUN_TEST_PIDS:-4096}
cg=/sys/fs/cgroup
own() { awk -F: -v c="$1" '$2 == c || $2 ~ ("(^|,)" c "(,|$)") {print $3; exit}' /proc/self/cgroup; }
name="sandrun-tests-$$"
runner=""
dirs=()    # the caps, removed at exit
home=()    # where this shell goes back to first, one per cap

cleanup() {
    # Leave the test cgroups first, then remove them (and anything left beneath).
    for h in "${home[@]}"; do
        echo $$ > "$h/cgroup.procs" 2>/dev/null || true
    done
    for d in "${dirs[@]}"; do
        [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
    rm -rf "$basetemp"
}
trap cleanup EXIT

if [ -f "$cg/cgroup.controllers" ]; then            # cgroup v2
    top=$cg$(own '')
    top=${top%/}
    if [ -f "$top/cgroup.type" ]; then               # not the root cgroup
        mapfile -t procs < "$top/cgroup.procs"       # a builtin: no process of its own
        if [ "${procs[*]}" != "$$" ]; then
            if [ -z "${SANDRUN_TEST_SCOPE:-}" ] && [ -d /run/systemd/system ] \
                    && command -v systemd-run >/dev/null; then
                echo "tests: ${top#$cg} holds other processes; re-running in a Delegate=yes scope"
                export SANDRUN_TEST_SCOPE=1
                exec systemd-run --scope --quiet --collect -p Delegate=yes \
                    --description="Sandrun tests" -- bash "$0" "$@"
            fi
            echo "cgroup v2: ${top#$cg} also holds other processes, so the tests cannot get a" \
                 "capped cgroup there: run them in a Delegate=yes scope" \
                 "(systemd-run --scope -p Delegate=yes bash ./scripts/test.sh) or service," \
                 "or from the root cgroup" >&2
            exit 1
        fi
        # Alone in a cgroup of our own: into a leaf, so that it may give its children limits.
        mkdir -p "$top/sandrun-tests-shell"
        echo $$ > "$top/sandrun-tests-shell/cgroup.procs"
        home=("$top/sandrun-tests-shell")
    else
        home=("$top")
    fi
    missing=$(tr ' ' '\n' < "$top/cgroup.controllers" | grep -cxE 'memory|pids|cpu' || true)
    if [ "$missing" != 3 ]; then
        echo "cgroup v2: ${top#$cg} lacks one of the memory, pids, cpu controllers;" \
             "refusing to run hostile tests uncapped" >&2
        exit 1
    fi
    echo "+memory +pids +cpu" > "$top/cgroup.subtree_control"
    dirs=("$top/$name")
    mkdir -p "${dirs[0]}/runner"
    echo "$MEMORY_CAP" > "${dirs[0]}/memory.max"
    echo "$PIDS_CAP" > "${dirs[0]}/pids.max"
    echo "+memory +pids +cpu" > "${dirs[0]}/cgroup.subtree_control"
    runner=${dirs[0]}/runner
elif [ -d "$cg/memory" ] && [ -d "$cg/pids" ]; then  # cgroup v1
    dirs=("$cg/memory$(own memory)/$name" "$cg/pids$(own pids)/$name")
    home=("$(dirname "${dirs[0]}")" "$(dirname "${dirs[1]}")")
    mkdir -p "${dirs[@]}"
    echo "$MEMORY_CAP" > "${dirs[0]}/memory.limit_in_bytes"
    echo "$PIDS_CAP" > "${dirs[1]}/pids.max"
    for d in "${dirs[@]}"; do echo $$ > "$d/cgroup.procs"; done
else
    echo "no cgroup memory/pids controllers: refusing to run hostile tests uncapped" >&2
    exit 1
fi
echo "tests capped at $((MEMORY_CAP / 1024 / 1024)) MiB and $PIDS_CAP processes ($PYTHON)"
if [ -n "${runner:-}" ]; then   # v2: pytest joins its leaf before it starts
    sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$runner" \
        "$PYTHON" -m pytest -q -p no:cacheprovider --basetemp="$basetemp" "$@"
else
    "$PYTHON" -m pytest -q -p no:cacheprovider --basetemp="$basetemp" "$@"
fi
