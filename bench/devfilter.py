"""Device filter benchmark: what cgroup v2's BPF device program costs, against a cgroup's mkdir.

On cgroup v2 every spare's cgroup gets the standard device program as it is
made, and a GPU job's gets a program of its own on its launch path
(``sandrun/sandbox/devices.py``).  This measures, on whatever cgroup2 mount the
host has (the unified hierarchy, or the controller-less ``/sys/fs/cgroup/unified``
of a v1 host, where device programs work the same), in one run:

(a) reference: ``mkdir`` and ``rmdir`` of an empty cgroup2 directory, which
    every spare already pays;
(b) a spare's extra: attaching the standard program (open, ``BPF_PROG_ATTACH``);
(c) a GPU job's extra: loading its program, attaching it over the standard
    one, closing it;
(d) the price on every device open: ``open`` and ``close`` of ``/dev/null``
    by a process in a filtered cgroup, against one in an unfiltered cgroup.

Needs root.  Run from the repository root::

    python3 bench/devfilter.py [-n 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from sandrun.sandbox import cgroups, devices

GPU_NODES = (("nvidia0", 195, 0), ("nvidiactl", 195, 255), ("nvidia-uvm", 508, 0),
             ("nvidia-uvm-tools", 508, 1))


def cgroup2_mount() -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return fields[4]
    sys.exit("no cgroup2 mount on this host")


def p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def opens_in(group: str, count: int) -> float:
    """Seconds per open+close of /dev/null, by a child in ``group``."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        cgroups._write(os.path.join(group, "cgroup.procs"), str(os.getpid()))
        start = time.perf_counter()
        for _ in range(count):
            os.close(os.open("/dev/null", os.O_RDONLY))
        os.write(w, repr((time.perf_counter() - start) / count).encode())
        os._exit(0)
    os.close(w)
    seconds = float(os.read(r, 100))
    os.close(r)
    os.waitpid(child, 0)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="rounds of (a), (b) and (c)")
    args = parser.parse_args()
    own = cgroups._own_cgroup(None).lstrip("/")
    base = os.path.join(cgroup2_mount(), own, f"sandrun-bench-{uuid.uuid4().hex[:8]}")
    os.mkdir(base)
    filters = devices.DeviceFilters()
    plain, standard, gpu = [], [], []
    try:
        for i in range(args.n):  # taking turns, so that a busy host weighs on all alike
            path = os.path.join(base, f"c{i}")
            t0 = time.perf_counter()
            os.mkdir(path)
            os.rmdir(path)
            t1 = time.perf_counter()
            os.mkdir(path)
            t2 = time.perf_counter()
            filters.attach_standard(path)
            t3 = time.perf_counter()
            filters.attach_gpu(path, GPU_NODES)
            t4 = time.perf_counter()
            os.rmdir(path)
            plain.append(t1 - t0)
            standard.append(t3 - t2)
            gpu.append(t4 - t3)
        bare_dir, filtered_dir = os.path.join(base, "bare"), os.path.join(base, "filtered")
        os.mkdir(bare_dir)
        os.mkdir(filtered_dir)
        filters.attach_standard(filtered_dir)
        rounds = [(opens_in(bare_dir, 20000), opens_in(filtered_dir, 20000)) for _ in range(9)]
        os.rmdir(bare_dir)
        os.rmdir(filtered_dir)
    finally:
        filters.close()
        os.rmdir(base)
    reference = p50_us(plain)
    print(f"cgroup2 at {cgroup2_mount()}, {args.n} rounds, load {os.getloadavg()[0]:.2f}")
    print(f"(a) mkdir+rmdir of a cgroup (reference)     p50 {reference:8.1f} us")
    print(f"(b) attach the standard program (per spare)  p50 {p50_us(standard):8.1f} us  "
          f"{p50_us(standard) / reference:.2f}x (a)")
    print(f"(c) load+attach a GPU job's program          p50 {p50_us(gpu):8.1f} us  "
          f"{p50_us(gpu) / reference:.2f}x (a)")
    # The fastest of 9 rounds each: the least disturbed by whatever else the host runs.
    bare = min(r[0] for r in rounds) * 1e9
    filtered = min(r[1] for r in rounds) * 1e9
    print(f"(d) open+close /dev/null, best of 9x20000: unfiltered {bare:.0f} ns, filtered "
          f"{filtered:.0f} ns ({filtered / bare:.2f}x)")


if __name__ == "__main__":
    main()
