#!/usr/bin/env bash
# Check Sandrun on a Debian 12 host with cgroup v2 only, in a VM (see ../shared/vm/README.md
# for the VM itself): install.sh as on a fresh machine (Debian's python3, no pip), the worker
# from a login shell and as the shipped systemd unit, then integration tests, once per
# cgroup the command starts in.  As root, from the project's root:
#
#   bash ./scripts/vm-check.sh                        session, then delegate; all integration tests
#   bash ./scripts/vm-check.sh session -- tests/integration/test_tls.py
#
# Modes (run-in-vm.sh's SR_VM_CGROUP): session (an SSH login's scope), delegate (a
# Delegate=yes scope), service (a plain systemd service), root (the root cgroup); and
# unit: the tests in a transient service with the shipped sandrun.service's options
# (Delegate=yes and its hardening), started from a login session.  The VM
# runs under software emulation here, 10-20x slower than the host: test timeouts are scaled
# by SANDRUN_TEST_TIME_SCALE (default 10).  Each mode's "== RESULT" lines and pytest's
# summary go to docs/vm-check-<mode>.md; the full logs to $SR_VM_LOGS (default /tmp/sandrun-vm).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNNER=${SR_VM_RUNNER:-../shared/vm/run-in-vm.sh}
LOGS=${SR_VM_LOGS:-/tmp/sandrun-vm}
SCALE=${SANDRUN_TEST_TIME_SCALE:-10}
modes=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do modes+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#modes[@]} -gt 0 ] || modes=(session delegate)
[ $# -gt 0 ] || set -- tests/integration
[ -x "$RUNNER" ] || { echo "no VM runner at $RUNNER (set SR_VM_RUNNER)" >&2; exit 2; }
mkdir -p "$LOGS"
status=0
for mode in "${modes[@]}"; do
    log=$LOGS/$mode.log
    report=docs/vm-check-$mode.md
    echo "== $mode: log in $log"
    start=$SECONDS
    set +e
    cgroup=$mode in_unit=0
    [ "$mode" = unit ] && cgroup=session in_unit=1
    SR_VM_PYTHON=raw SR_VM_CGROUP=$cgroup "$RUNNER" . -- \
        env SANDRUN_TEST_TIME_SCALE="$SCALE" SR_TESTS_IN_UNIT=$in_unit \
        bash ./scripts/vm-guest-check.sh "$@" \
        > "$log" 2>&1
    rc=$?
    set -e
    [ $rc = 0 ] || status=$rc
    {
        echo "# Sandrun in a Debian 12 VM (cgroup v2), started from: $mode"
        echo
        echo "Made by \`scripts/vm-check.sh $mode -- $*\` on $(date -u +%Y-%m-%dT%H:%MZ)" \
             "from commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
             "(mode $mode, SR_VM_CGROUP=$cgroup, SR_VM_PYTHON=raw: install.sh ran as on a fresh host, with" \
             "Debian's python3, no pip and no network); exited $rc after" \
             "$(( (SECONDS - start) / 60 )) min."
        echo
        echo '```'
        grep -E '^== RESULT|^    |^install.sh:|^sandrun installed|^tests capped|^tests:' "$log" \
            | sed 's/^== RESULT //' || true
        grep -E '^(FAILED|ERROR) |^=+ .*(passed|failed|error).* =+$|[0-9]+ (passed|failed)' "$log" \
            | tail -40 || true
        tail -1 "$log"
        echo '```'
    } > "$report"
    echo "== $mode: summary in $report"
done
exit $status
