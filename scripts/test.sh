#!/usr/bin/env bash
# Run Sandrun's test suite as root, inside an outer cgroup cap, so that a
# broken sandbox fails a test instead of taking the machine down.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MEMORY_CAP=${SANDRUN_TEST_MEMORY:-$((8 * 1024 * 1024 * 1024))}
PIDS_CAP=${SANDRUN_TEST_PIDS:-4096}
cg=/sys/fs/cgroup
# The cap is made beneath the cgroup we were started in, so any outer limit still holds.
own() { awk -F: -v c="$1" '$2 == c || $2 ~ ("(^|,)" c "(,|$)") {print $3; exit}' /proc/self/cgroup; }
name="sandrun-tests-$$"
dirs=()

cleanup() {
    # Leave the test cgroups first, then remove them (and anything left beneath).
    for d in "${dirs[@]}"; do
        echo $$ > "$(dirname "$d")/cgroup.procs" 2>/dev/null || true
    done
    for d in "${dirs[@]}"; do
        [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
}
trap cleanup EXIT

if [ -f "$cg/cgroup.controllers" ]; then            # cgroup v2
    parent="$cg$(own '')"
    dirs=("$parent/$name")
    mkdir -p "${dirs[0]}"
    echo "$MEMORY_CAP" > "${dirs[0]}/memory.max"
    echo "$PIDS_CAP" > "${dirs[0]}/pids.max"
    echo $$ > "${dirs[0]}/cgroup.procs"
elif [ -d "$cg/memory" ] && [ -d "$cg/pids" ]; then  # cgroup v1
    dirs=("$cg/memory$(own memory)/$name" "$cg/pids$(own pids)/$name")
    mkdir -p "${dirs[@]}"
    echo "$MEMORY_CAP" > "${dirs[0]}/memory.limit_in_bytes"
    echo "$PIDS_CAP" > "${dirs[1]}/pids.max"
    for d in "${dirs[@]}"; do echo $$ > "$d/cgroup.procs"; done
else
    echo "no cgroup memory/pids controllers: refusing to run hostile tests uncapped" >&2
    exit 1
fi
echo "tests capped at $((MEMORY_CAP / 1024 / 1024)) MiB and $PIDS_CAP processes"
"$PYTHON" -m pytest -q -p no:cacheprovider "$@"
