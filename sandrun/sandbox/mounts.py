"""The job's filesystem: a fresh tmpfs root, pivoted into.

Layout inside the sandbox::

    /usr            host /usr, read-only, nosuid, nodev
    /bin /lib ...   symlinks into /usr, as on a merged-/usr host
    /etc            a small prepared copy (see ``prepare_etc``), read-only
    /job            the job directory, read-write, nosuid, nodev (the cwd)
    /tmp            tmpfs, size-capped, per job
    /dev            null zero full random urandom, fd links; /dev/shm tmpfs, size-capped
    /proc           a fresh proc of the job's PID namespace
    (no /sys, /run, /root, /home, /var)

The root is built in two halves, both in the job's process after it
unshared its mount namespace, so nothing is visible to the host and all of it
vanishes with the job.  ``prepare_root`` does everything that is the same for
every job (the binds of the runtime, /etc and /dev, /proc, the pivot) before
the job is known; ``finish_root`` then attaches the job's own directory and
read-only extras, received as detached mounts (``open_tree``) because the
prepared namespace is a copy taken earlier and would not see a mount the
worker made since, and mounts the size-capped scratch tmpfs.
"""

from __future__ import annotations

import os
import stat

from sandrun.sandbox import namespaces as ns
from sandrun.sandbox.policy import JOB_DIR, SandboxPolicy

RO = ns.MS_RDONLY | ns.MS_NOSUID | ns.MS_NODEV
# The only places a request's extra read-only binds may go (an environment, dependencies).
RO_BIND_TARGETS = ("/opt/env", "/opt/deps")
TOP_LINKS = ("bin", "lib", "lib32", "lib64", "libx32", "sbin")
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
           ("urandom", 1, 9))
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"))
# Host files and directories interpreters need from /etc; copied once at start.  Patterns
# (glob) for what is named by version: python3.11 on Debian 12, python3.12 on Ubuntu 24.04.
ETC_ENTRIES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "localtime",
               "mime.types", "alternatives", "R", "php", "ssl/certs", "ssl/openssl.cnf",
               "ca-certificates.conf", "host.conf", "gai.conf", "protocols", "services",
               "timezone", "npmrc", "gemrc", "perl", "python3", "python3.[0-9]*")


def prepare_etc(dest: str, slot_uids: range, gid_of: dict[int, int],
                host_etc: str = "/etc") -> None:
    """Build the sandbox's /etc at ``dest``: a few host files and our own passwd.

    Runs in the worker, at start; ``glob`` and ``shutil`` are imported here so
    that the launcher, which imports this module too, does not load them.
    """
    import glob
    import shutil

    if os.path.isdir(dest):
        shutil.rmtree(dest)
    os.makedirs(dest, mode=0o755)
    found = (src for entry in ETC_ENTRIES
             for src in sorted(glob.glob(os.path.join(glob.escape(host_etc), entry))))
    for src in found:
        dst = os.path.join(dest, os.path.relpath(src, host_etc))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
    users = ["root:x:0:0:root:/nonexistent:/usr/sbin/nologin",
             "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"]
    groups = ["root:x:0:", "nogroup:x:65534:"]
    for uid in slot_uids:
        users.append(f"job{uid}:x:{uid}:{gid_of[uid]}:sandrun job:{JOB_DIR}:/bin/sh")
        groups.append(f"job{uid}:x:{gid_of[uid]}:")
    files = {"passwd": users, "group": groups, "hostname": ["sandrun"],
             "hosts": ["127.0.0.1 localhost sandrun", "::1 localhost ip6-localhost"],
             "resolv.conf": ["# no network inside the sandbox"]}
    for name, lines in files.items():
        with open(os.path.join(dest, name), "w") as f:
            f.write("\n".join(lines) + "\n")


def prepare_templates(root_template: str, dev_template: str) -> None:
    """Build, once, the skeletons every job's root and /dev are bound from.

    A job then pays for one bind mount each instead of a dozen mkdir, mknod
    and symlink calls.  The directories are only mount points: everything a
    job can write is a fresh tmpfs or its own job directory.
    """
    import shutil

    for path in (root_template, dev_template):
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.makedirs(path, mode=0o755)
    for name in ("usr", "etc", "job", "tmp", "dev", "proc", ".old", "opt", "opt/env",
                 "opt/deps"):
        os.mkdir(os.path.join(root_template, name), 0o755)
    for name in TOP_LINKS:
        host = os.path.join("/", name)
        if os.path.islink(host):
            os.symlink(os.readlink(host), os.path.join(root_template, name))
        elif os.path.isdir(host):
            os.mkdir(os.path.join(root_template, name), 0o755)
    for name, major, minor in DEVICES:
        path = os.path.join(dev_template, name)
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(path, 0o666)  # mknod honours the umask
    for name, target in DEV_LINKS:
        os.symlink(target, os.path.join(dev_template, name))
    os.mkdir(os.path.join(dev_template, "shm"), 0o1777)
    os.chmod(os.path.join(dev_template, "shm"), 0o1777)


def _bind(src: str, dst: str, flags: int) -> None:
    ns.mount(src, dst, None, ns.MS_BIND)
    # A bind mount ignores flags until it is remounted.
    ns.mount(None, dst, None, ns.MS_REMOUNT | ns.MS_BIND | flags)


def _tmpfs(dst: str, size: int, flags: int) -> None:
    ns.mount("tmpfs", dst, "tmpfs", flags, f"size={size},mode=1777")


def host_lib_dirs() -> tuple[str, ...]:
    """The top-level library directories that are real directories on this host.

    On a merged-/usr host there are none: /bin, /lib... are symlinks, which
    the root template reproduces.
    """
    return tuple(name for name in TOP_LINKS
                 if os.path.isdir(os.path.join("/", name))
                 and not os.path.islink(os.path.join("/", name)))


def prepare_root(root: str, templates: str, lib_dirs: tuple[str, ...]) -> None:
    """Mount the parts of a root every job shares, pivot into it and drop the host's.

    ``templates`` holds ``rootfs``, ``dev`` and ``etc`` as made by
    ``prepare_templates`` and ``prepare_etc``; ``lib_dirs`` is what
    ``host_lib_dirs`` found.  Afterwards the process sees only the new root,
    read-only, and nothing of the host but /usr.
    """
    ns.mount(None, "/", None, ns.MS_REC | ns.MS_PRIVATE)
    ns.mount(os.path.join(templates, "rootfs"), root, None, ns.MS_BIND)
    _bind("/usr", os.path.join(root, "usr"), RO)
    for name in lib_dirs:
        _bind(os.path.join("/", name), os.path.join(root, name), RO)
    _bind(os.path.join(templates, "etc"), os.path.join(root, "etc"), RO)
    _bind(os.path.join(templates, "dev"), os.path.join(root, "dev"),
          ns.MS_RDONLY | ns.MS_NOSUID | ns.MS_NOEXEC)
    ns.mount("proc", os.path.join(root, "proc"), "proc",
             ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC)
    ns.pivot_root(root, os.path.join(root, ".old"))
    os.chdir("/")
    ns.umount("/.old", ns.MNT_DETACH)
    # Mount points beneath a read-only mount can still be mounted on.
    ns.mount(None, "/", None, ns.MS_REMOUNT | ns.MS_BIND | RO)


def check_ro_binds(ro_binds: tuple[tuple[str, str], ...]) -> None:
    """Refuse extra binds to anywhere but the two fixed places."""
    for host, inside in ro_binds:
        # Exact names only: anything else could cover /etc or climb out with "..".
        if inside not in RO_BIND_TARGETS or not os.path.isabs(host):
            raise ValueError(f"read-only bind {host!r} -> {inside!r} is not allowed")


def finish_root(policy: SandboxPolicy, job_tree: int,
                extras: list[tuple[int, str]]) -> None:
    """Attach the job directory and extras, mount the scratch tmpfs; cwd ends at /job.

    ``job_tree`` and each extra's descriptor come from ``ns.open_tree_clone``;
    the extras' targets must have passed ``check_ro_binds``.
    """
    _attach(job_tree, JOB_DIR, ns.MS_NOSUID | ns.MS_NODEV)
    _tmpfs("/tmp", policy.tmp_bytes, ns.MS_NOSUID | ns.MS_NODEV)
    if policy.gpu is not None:
        gpu_dev(policy.gpu.nodes)
    _tmpfs("/dev/shm", policy.shm_bytes, ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC)
    for tree, inside in extras:
        if inside not in RO_BIND_TARGETS:
            raise ValueError(f"read-only bind to {inside!r} is not allowed")
        _attach(tree, inside, RO)
    os.chdir(JOB_DIR)


def gpu_dev(nodes: tuple[tuple[str, int, int], ...]) -> None:
    """Replace the shared /dev with one that also holds a GPU job's nodes.

    A fresh small tmpfs over /dev (in the job's own mount namespace) with the
    standard devices, the given character devices (made by number, as the
    host's are: ``devices.check_nodes`` passed them), the same links, and an
    empty ``shm``; read-only once made.  The job's device cgroup allows only
    these (see ``devices``).
    """
    ns.mount("tmpfs", "/dev", "tmpfs", ns.MS_NOSUID | ns.MS_NOEXEC, "size=64k,mode=755")
    for name, major, minor in (*DEVICES, *nodes):
        path = os.path.join("/dev", name)
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(path, 0o666)  # mknod honours the umask
    for name, target in DEV_LINKS:
        os.symlink(target, os.path.join("/dev", name))
    os.mkdir("/dev/shm", 0o1777)
    os.chmod("/dev/shm", 0o1777)
    ns.mount(None, "/dev", None, ns.MS_REMOUNT | ns.MS_RDONLY | ns.MS_NOSUID | ns.MS_NOEXEC)


def _attach(tree: int, target: str, flags: int) -> None:
    ns.move_mount(tree, target)
    ns.mount(None, target, None, ns.MS_REMOUNT | ns.MS_BIND | flags)
