#!/usr/bin/env bash
# The guest side of scripts/vm-check.sh: runs as root inside the Debian 12 VM, in the
# copied checkout, after `bash ./scripts/install.sh` ran there as on a fresh machine.
#   1. `sandrun serve` started the README's way, from wherever this script runs, and a job;
#   2. the shipped systemd unit (`sandrun install-service`), a job through it, its journal;
#   3. the worker alone at the root of its own cgroup namespace, as in a container;
#   4. the test suite (its arguments), by exec, so that it runs in this script's cgroup.
# SR_GUEST_STEPS chooses some of them by name (default all: "serve service container tests"),
# e.g. SR_GUEST_STEPS=container to re-run only step 3.
# Lines starting "== RESULT" are what vm-check.sh keeps in docs/vm-check.md.
set -uo pipefail
URL=http://127.0.0.1:8443
STEPS=" ${SR_GUEST_STEPS:-serve service container tests} "
step() { [[ $STEPS == *" $1 "* ]]; }

job() {  # run print(6*7) through the worker at $URL; prints its reason and stdout
    local reply id status
    reply=$(curl -s -X POST "$URL/submit" -H 'Content-Type: application/json' \
        -d '{"manifest": {"entrypoint": "main.py", "memory_mb": 64}, "files": {"main.py": "print(6*7)"}}')
    id=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["job_id"])' "$reply") \
        || { echo "submit failed: $reply"; return 1; }
    for _ in $(seq 300); do
        status=$(curl -s "$URL/status/$id")
        python3 -c 'import json, sys; sys.exit(json.loads(sys.argv[1])["status"] in ("queued", "running"))' \
            "$status" && break
        sleep 1
    done
    python3 -c 'import json, sys; print(json.loads(sys.argv[1])["execution_metadata"]["reason"], end=" ")' "$status"
    curl -s "$URL/logs/$id" | python3 -c 'import json, sys; print(repr(json.load(sys.stdin)["stdout"]))'
}

healthy() {
    for _ in $(seq 300); do curl -sf "$URL/health" >/dev/null && return 0; sleep 1; done
    return 1
}

echo "== RESULT host: Debian $(cat /etc/debian_version), kernel $(uname -r)," \
     "$(stat -fc %T /sys/fs/cgroup), python3 $(python3 -c 'import platform; print(platform.python_version())');" \
     "this script in cgroup $(cut -d: -f3 /proc/self/cgroup)"
echo "== RESULT sandrun on the PATH: $(command -v sandrun) ($(sandrun --version))"

# 1. From here, as the README says.
if step serve; then
    sandrun serve > /tmp/serve.log 2>&1 &
    worker=$!
    if healthy; then
        echo "== RESULT serve from this shell: job $(job)"
        echo "== RESULT serve's cgroup: $(cut -d: -f3 /proc/$worker/cgroup)"
    else
        echo "== RESULT serve from this shell: never healthy"
    fi
    grep -m1 "^sandrun:" /tmp/serve.log | sed 's/^/== RESULT serve said: /'
    kill -TERM "$worker" 2>/dev/null
    wait "$worker"
    echo "== RESULT serve exited $? on SIGTERM"
fi

# 2. The shipped unit.
if ! step service; then
    :
elif sandrun install-service >/tmp/install-service.log 2>&1 && healthy; then
    echo "== RESULT sandrun.service: $(systemctl is-active sandrun.service)," \
         "cgroup $(systemctl show -p ControlGroup --value sandrun.service); job $(job)"
    echo "== RESULT sandrun.service job cgroups beside its leaf:" \
         "$(ls "/sys/fs/cgroup$(systemctl show -p ControlGroup --value sandrun.service)" | grep -E '^(supervisor|sandrun-)' | paste -sd' ')"
    echo "== RESULT journal, one line per event (last 3):"
    journalctl -u sandrun.service -o cat --no-pager -n 3 | sed 's/^/    /'
    systemctl stop sandrun.service
    echo "== RESULT sandrun.service stopped: $(systemctl is-active sandrun.service)"
else
    echo "== RESULT sandrun.service: failed to start"
    cat /tmp/install-service.log
    journalctl -u sandrun.service -o cat --no-pager -n 20 | sed 's/^/    /'
fi

# 3. As in a container with its own cgroup namespace and a writable cgroup2 mount (what
#    `docker run --privileged --cgroupns=private` gives): the worker alone in a cgroup that is
#    the root of its namespace, as PID 1 of a container would be.
if step container; then
    ct=/sys/fs/cgroup/sandrun-container-check
    mkdir -p "$ct"
    (
        echo "$BASHPID" > "$ct/cgroup.procs"
        exec unshare --cgroup --mount --propagation private sh -c \
            'umount -l /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec sandrun serve --listen 127.0.0.1:8444 --state-dir /run/sandrun-ct'
    ) > /tmp/container.log 2>&1 &
    container=$!
    if URL=http://127.0.0.1:8444 healthy; then
        echo "== RESULT own cgroup namespace: job $(URL=http://127.0.0.1:8444 job);" \
             "worker in host cgroup $(cut -d: -f3 /proc/$container/cgroup);" \
             "made: $(ls "$ct" | grep -E '^(supervisor|sandrun-)' | paste -sd' ')"
    else
        echo "== RESULT own cgroup namespace: never healthy"; tail -5 /tmp/container.log
    fi
    kill -TERM "$container" 2>/dev/null
    wait "$container"
    echo "== RESULT own cgroup namespace: worker exited $? on SIGTERM"
    rmdir "$ct/supervisor" "$ct" 2>/dev/null
fi

# 4. The tests: in this script's own cgroup, or (SR_TESTS_IN_UNIT=1) in a transient service
#    with the shipped unit's own sandboxing: Delegate=yes and every hardening option of
#    sandrun.service, the checkout made writable (ProtectHome=read-only covers /root).
step tests || exit 0
if [ "${SR_TESTS_IN_UNIT:-0}" = 1 ]; then
    props=()
    while IFS= read -r line; do
        case "$line" in
            Delegate=*|KillMode=*|NoNewPrivileges=*|Protect*=*|PrivateTmp=*|Restrict*=*|\
            LockPersonality=*|SystemCallArchitectures=*|Limit*=*)
                props+=(-p "$line") ;;
        esac
    done < sandrun/systemd/sandrun.service
    echo "== RESULT tests: in a transient service with sandrun.service's options: ${props[*]}"
    echo "== RESULT tests: bash ./scripts/test.sh $*"
    exec systemd-run --wait --pipe --quiet --collect --unit sandrun-tests "${props[@]}" \
        -p ReadWritePaths="$PWD" -p WorkingDirectory="$PWD" \
        -E PATH="$PATH" -E SANDRUN_TEST_TIME_SCALE="${SANDRUN_TEST_TIME_SCALE:-1}" \
        bash ./scripts/test.sh "$@"
fi
echo "== RESULT tests: bash ./scripts/test.sh $*"
exec bash ./scripts/test.sh "$@"
