"""RAM-only job storage: tmpfs mounts the worker makes and removes itself.

Layout under the state directory (itself a tmpfs the worker mounts)::

    <state>/uploads/        request bodies while they arrive (unlinked temp files)
    <state>/jobs/<id>/      one size-capped tmpfs per job
                 work/      the job directory, bound at /job in the sandbox
                 staging/   archives between upload and extraction
    <state>/jobs/<id>.log   the job's output (see ``model.JobLog``), on the state tmpfs

Nothing here ever touches a disk.  At start every leftover job mount of a
crashed worker is unmounted and removed.
"""

from __future__ import annotations

import os
import shutil

from twisted.logger import Logger

from sandrun.sandbox import namespaces as ns

log = Logger()


def _is_mountpoint(path: str) -> bool:
    return os.path.ismount(path)


class StorageFull(Exception):
    pass


class Storage:
    def __init__(self, state_dir: str, job_dir_bytes: int, total_bytes: int) -> None:
        self.state_dir = state_dir
        self.jobs_dir = os.path.join(state_dir, "jobs")
        self.uploads_dir = os.path.join(state_dir, "uploads")
        self.job_dir_bytes = job_dir_bytes
        self.total_bytes = total_bytes or _quarter_of_ram()

    def start(self) -> int:
        """Mount the state tmpfs if needed and clean leftovers; returns how many."""
        os.makedirs(self.state_dir, exist_ok=True)
        # Not nodev: the sandbox's /dev template holds device nodes.  Request
        # bodies in flight are spooled here, so it is as large as all job data
        # may be (pages are only used as they are written).
        options = f"size={self.total_bytes + 64 * 1024 * 1024},mode=0700"
        if not _is_mountpoint(self.state_dir):
            ns.mount("tmpfs", self.state_dir, "tmpfs", ns.MS_NOSUID, options)
        else:  # left by a crashed worker, perhaps of another size
            ns.mount(None, self.state_dir, None, ns.MS_REMOUNT | ns.MS_NOSUID, options)
        os.makedirs(self.uploads_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.jobs_dir, mode=0o711, exist_ok=True)
        stale = 0
        for name in os.listdir(self.jobs_dir):
            self._remove(os.path.join(self.jobs_dir, name))
            stale += 1
        for name in os.listdir(self.uploads_dir):
            os.unlink(os.path.join(self.uploads_dir, name))
        return stale

    def stop(self) -> None:
        for name in os.listdir(self.jobs_dir):
            self._remove(os.path.join(self.jobs_dir, name))
        if _is_mountpoint(self.state_dir):
            ns.umount(self.state_dir, ns.MNT_DETACH)

    def used_bytes(self) -> int:
        used = 0
        for name in os.listdir(self.jobs_dir):
            st = os.statvfs(os.path.join(self.jobs_dir, name))
            used += (st.f_blocks - st.f_bfree) * st.f_frsize
        return used

    def create(self, job_id: str) -> str:
        """Mount a fresh tmpfs for a job; returns the job's base directory."""
        if self.used_bytes() >= self.total_bytes:
            raise StorageFull("the worker holds as much job data as it may")
        base = os.path.join(self.jobs_dir, job_id)
        os.mkdir(base, 0o700)
        try:
            ns.mount("tmpfs", base, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV,
                     f"size={self.job_dir_bytes},mode=0711")
            os.mkdir(os.path.join(base, "work"), 0o755)
            os.mkdir(os.path.join(base, "staging"), 0o700)
        except OSError:
            self._remove(base)
            raise
        return base

    def delete(self, job_id: str) -> None:
        self._remove(os.path.join(self.jobs_dir, job_id))

    def _remove(self, base: str) -> None:
        if _is_mountpoint(base):
            ns.umount(base, ns.MNT_DETACH)
        if os.path.isdir(base):
            shutil.rmtree(base, ignore_errors=True)
        elif os.path.lexists(base):  # a stale output log
            os.unlink(base)


def work_dir(base: str) -> str:
    return os.path.join(base, "work")


def staging_dir(base: str) -> str:
    return os.path.join(base, "staging")


def disk_full(base: str) -> bool:
    """True when the job's tmpfs has (almost) no room left: a disk_limit end."""
    st = os.statvfs(base)
    return st.f_bavail * st.f_frsize < 64 * 1024 or st.f_favail == 0


def _quarter_of_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
