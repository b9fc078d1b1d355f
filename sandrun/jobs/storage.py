"""RAM-only job storage: tmpfs mounts the worker makes and removes itself.

Layout under the state directory (itself a tmpfs the worker mounts)::

    <state>/uploads/        request bodies while they arrive (unlinked temp files)
    <state>/jobs/<id>/      one size-capped tmpfs per job
                 work/      the job directory, bound at /job in the sandbox
                 staging/   archives between upload and extraction
    <state>/jobs/<id>.log   the job's output (see ``model.JobLog``), on the state tmpfs

Nothing here ever touches a disk.  At start every leftover job mount of a
crashed worker is unmounted and removed.  The state tmpfs is a private mount,
so job mounts are seen in the worker's own mount namespace only; the sandbox
receives each job's directory as a detached mount (``open_tree``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading

from twisted.logger import Logger

from sandrun.sandbox import namespaces as ns

log = Logger()


def _is_mountpoint(path: str) -> bool:
    return os.path.ismount(path)


class StorageFull(Exception):
    pass


class StateDirInUse(Exception):
    """Another worker holds the state directory: starting would destroy its jobs."""


PARTIAL = ".part"  # suffix of a pack still being written
INODE_BYTES = 1024  # what a file or directory costs in kernel memory, charged as storage


class Storage:
    """The worker's tmpfs mounts and a running total of the job data they hold.

    The total is kept per job (``measure``: after the upload is written, at the
    job's end and once its outputs are packed; dropped on ``delete``), so checking
    the cap on a submission costs nothing however many jobs are held.  ``create``,
    ``measure`` and ``delete`` may run in threads (mounting and unmounting are
    kernel work kept off the reactor): the figures are kept under a lock.
    """

    def __init__(self, state_dir: str, job_dir_bytes: int, total_bytes: int,
                 job_dir_inodes: int = 0) -> None:
        self.state_dir = state_dir
        self.jobs_dir = os.path.join(state_dir, "jobs")
        self.uploads_dir = os.path.join(state_dir, "uploads")
        self.job_dir_bytes = job_dir_bytes
        # Files and directories a job's tmpfs may hold (0: the kernel's default, half
        # the RAM's pages): each costs kernel memory that no byte limit counts.
        self.job_dir_inodes = job_dir_inodes
        self.total_bytes = total_bytes or _quarter_of_ram()
        self._lock: int | None = None
        self._figures = threading.Lock()
        self._sizes: dict[str, int] = {}  # job id -> bytes last measured for it
        self._used = 0

    def _take_lock(self) -> None:
        """One worker per state directory; the lock dies with the process."""
        fd = os.open(self.state_dir.rstrip("/") + ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirInUse(f"another worker is using {self.state_dir}") from None
        self._lock = fd

    def start(self) -> int:
        """Mount the state tmpfs if needed and clean leftovers; returns how many."""
        os.makedirs(self.state_dir, exist_ok=True)
        self._take_lock()
        # Not nodev: the sandbox's /dev template holds device nodes.  Request
        # bodies in flight are spooled here, so it is as large as all job data
        # may be (pages are only used as they are written).
        options = f"size={self.total_bytes + 64 * 1024 * 1024},mode=0700"
        if not _is_mountpoint(self.state_dir):
            ns.mount("tmpfs", self.state_dir, "tmpfs", ns.MS_NOSUID, options)
        else:  # left by a crashed worker, perhaps of another size
            ns.mount(None, self.state_dir, None, ns.MS_REMOUNT | ns.MS_NOSUID, options)
        # Private: the job mounts made beneath it stay in this mount namespace.  Were it
        # shared, each would also appear in the launcher's namespace (a copy of this one
        # taken at its start), and every job's new namespace, copied from the launcher's,
        # would copy every job mount the worker holds: thousands, for a busy worker.
        ns.mount(None, self.state_dir, None, ns.MS_PRIVATE)
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
        with self._figures:
            self._sizes.clear()
            self._used = 0
        for name in os.listdir(self.jobs_dir):
            self._remove(os.path.join(self.jobs_dir, name))
        if _is_mountpoint(self.state_dir):
            ns.umount(self.state_dir, ns.MNT_DETACH)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def used_bytes(self) -> int:
        """Bytes held by all jobs (tmpfs pages, inodes, logs, packs), as last measured."""
        return self._used

    def create(self, job_id: str) -> str:
        """Mount a fresh tmpfs for a job; returns the job's base directory."""
        with self._figures:
            if self._used >= self.total_bytes:
                raise StorageFull("the worker holds as much job data as it may")
            self._sizes[job_id] = 0
        base = os.path.join(self.jobs_dir, job_id)
        try:
            os.mkdir(base, 0o700)
            inodes = f",nr_inodes={self.job_dir_inodes}" if self.job_dir_inodes else ""
            ns.mount("tmpfs", base, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV,
                     f"size={self.job_dir_bytes},mode=0711{inodes}")
            os.mkdir(os.path.join(base, "work"), 0o755)
            os.mkdir(os.path.join(base, "staging"), 0o700)
        except OSError:
            self.delete(job_id)
            raise
        return base

    def measure(self, job_id: str) -> int:
        """Measure what a job holds now and update the total; its bytes (0 once deleted).

        Its tmpfs (pages, and each file's inode: an empty file takes no block, but
        kernel memory all the same), its output log and its download pack.
        """
        base = os.path.join(self.jobs_dir, job_id)
        used = 0
        try:
            st = os.statvfs(base)
            used += (st.f_blocks - st.f_bfree) * st.f_frsize
            used += (st.f_files - st.f_ffree) * INODE_BYTES
        except OSError:
            pass
        for path in (base + ".log", self.pack_path(job_id), self.pack_path(job_id) + PARTIAL):
            try:
                used += os.lstat(path).st_blocks * 512
            except OSError:
                continue
        with self._figures:
            if job_id not in self._sizes:  # deleted meanwhile
                return 0
            self._used += used - self._sizes[job_id]
            self._sizes[job_id] = used
        return used

    def delete(self, job_id: str) -> None:
        """Remove a job's tmpfs and its download pack.  Blocking: unmounting a tmpfs
        frees every file in it (a million of them take seconds); call it from a thread."""
        with self._figures:
            self._used -= self._sizes.pop(job_id, 0)
        self._remove(os.path.join(self.jobs_dir, job_id))
        for path in (self.pack_path(job_id), self.pack_path(job_id) + PARTIAL):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def pack_path(self, job_id: str) -> str:
        """Where a job's outputs are packed for ``/download``, once (on the state tmpfs,
        counted in ``used_bytes``)."""
        return os.path.join(self.jobs_dir, job_id + ".tar.gz")

    def _remove(self, base: str) -> None:
        if _is_mountpoint(base):
            try:
                ns.umount(base, ns.MNT_DETACH)
            except OSError:  # unmounted meanwhile (a delete in a thread and a stop)
                if _is_mountpoint(base):
                    raise
        if os.path.isdir(base):
            shutil.rmtree(base, ignore_errors=True)
        elif os.path.lexists(base):  # a stale output log
            os.unlink(base)


def work_dir(base: str) -> str:
    return os.path.join(base, "work")


def staging_dir(base: str) -> str:
    return os.path.join(base, "staging")


# A job whose tmpfs holds at most this much is "small": its chown and its listing cost less
# than a trip to a thread, and the worker makes them on the reactor thread (a snippet).
SMALL_JOB_INODES = 16  # files and directories, the tmpfs's own root included
SMALL_JOB_BYTES = 64 * 1024


def is_small(base: str) -> bool:
    """Whether the job's tmpfs at ``base`` holds at most ``SMALL_JOB_INODES`` inodes and
    ``SMALL_JOB_BYTES`` (one ``statvfs``); False where it is not a tmpfs with an inode cap."""
    try:
        st = os.statvfs(base)
    except OSError:
        return False
    return 0 < st.f_files and st.f_files - st.f_ffree <= SMALL_JOB_INODES \
        and (st.f_blocks - st.f_bfree) * st.f_frsize <= SMALL_JOB_BYTES


def disk_full(base: str) -> bool:
    """True when the job's tmpfs has (almost) no room left: a disk_limit end."""
    st = os.statvfs(base)
    return st.f_bavail * st.f_frsize < 64 * 1024 or st.f_favail == 0


def _quarter_of_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
