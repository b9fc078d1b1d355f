#!/usr/bin/env bash
# Run Sandrun's test suite as root, inside an outer cgroup cap, so that a
# broken sandbox fails a test instead of taking the machine down.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MEMORY_CAP=${SANDRUN_TEST_MEMORY:-$((8 * 1024 * 1024 * 1024))}
PIDS_CAP=${SANDRUN_TEST_PIDS:-4096}
name="sandrun-tests-$$"
cg=/sys/fs/cgroup

cleanup() {
    for d in "$cg/memory/$name" "$cg/pids/$name" "$cg/$name"; do
        [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
}
trap cleanup EXIT

if [ -f "$cg/cgroup.controllers" ]; then            # cgroup v2
    mkdir -p "$cg/$name"
    echo "+memory +pids" > "$cg/cgroup.subtree_control" 2>/dev/null || true
    echo "$MEMORY_CAP" > "$cg/$name/memory.max"
    echo "$PIDS_CAP" > "$cg/$name/pids.max"
    echo $$ > "$cg/$name/cgroup.procs"
elif [ -d "$cg/memory" ] && [ -d "$cg/pids" ]; then  # cgroup v1
    mkdir -p "$cg/memory/$name" "$cg/pids/$name"
    echo "$MEMORY_CAP" > "$cg/memory/$name/memory.limit_in_bytes"
    echo "$PIDS_CAP" > "$cg/pids/$name/pids.max"
    echo $$ > "$cg/memory/$name/cgroup.procs"
    echo $$ > "$cg/pids/$name/cgroup.procs"
else
    echo "no cgroup memory/pids controllers: refusing to run hostile tests uncapped" >&2
    exit 1
fi
echo "tests capped at $((MEMORY_CAP / 1024 / 1024)) MiB and $PIDS_CAP processes"
"$PYTHON" -m pytest -q -p no:cacheprovider "$@"
