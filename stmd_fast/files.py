"""Writing files so that no kill and no full disk leaves a partial one, and the run directory's lock.

Every output of stmd_fast (checkpoints, sample grids, exported programs, latent shards, manifests)
is serialized in memory and written here with Python file I/O, to a temporary name beside the
target, fsynced, then renamed over it: a reader or a crash sees the old file or the new one, never
half; a full disk is an OSError (ENOSPC) that removes the temporary file. (torch's C++ writers,
torch.save and torch.export.save to a path, can abort the whole process on a full disk instead.)
"""
from __future__ import annotations

import errno
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


class WriteFailed(Exception):
    """An output could not be written (a full disk, a vanished folder); nothing partial is left. The
    message is the one line the command line prints (exit code 1)."""


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (which makes its entries durable: a rename, a new file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Write, flush and fsync `path`; a failed write (e.g. ENOSPC) removes the partial file and re-raises."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise


def temp_sibling(path: Path) -> Path:
    """Where `path` is written before the rename: hidden, in the same folder (a rename across file
    systems would not be atomic), named per process so two writers never share it."""
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def remove_stale_temps(folder: Path, min_age_s: float = 0.0) -> None:
    """Remove the temporary files (temp_sibling's .tmp-PID-NAME) in `folder` that a killed process left: of a
    PID no process here has, and older than min_age_s (a folder shared with other machines: their PIDs
    are not ours to test)."""
    for leftover in Path(folder).glob(".tmp-*-*"):
        pid = leftover.name.split("-")[1]
        try:
            if not pid.isdigit() or not leftover.is_file() or time.time() - leftover.stat().st_mtime < min_age_s:
                continue
            os.kill(int(pid), 0)  # raises if no such process
        except ProcessLookupError:
            leftover.unlink(missing_ok=True)
        except OSError:  # alive under another user (EPERM), or the file went meanwhile
            continue


def write_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` by `data`: written to a temporary sibling, fsynced, renamed over it."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        write_bytes_durably(tmp, data)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)  # a full disk must not keep a partial temporary file
        if isinstance(err, OSError) and err.errno is not None:  # named by the file meant, not the temporary one
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    fsync_path(path.parent)


WRITE_FIXES = {errno.ENOSPC: "free space", errno.EDQUOT: "free space within your quota",
               errno.EFBIG: "the file outgrew a size limit: raise it (ulimit -f) or use a file system that takes it",
               errno.EROFS: "make --out writable (its file system is read-only)",
               errno.EACCES: "make --out writable (permissions)", errno.EPERM: "make --out writable (permissions)",
               errno.EIO: "check the disk (an I/O error)",
               errno.ENOTDIR: "a folder in its path is a file: move that file aside"}


def write_fix(err: OSError, otherwise: str = "check --out") -> str:
    """What to do about a write that failed with `err`, by its cause (a full disk is not a size limit)."""
    return WRITE_FIXES.get(err.errno, otherwise)


def local_pattern(name: str | None) -> str | None:
    """local_path for --data, which may also be a pattern of latent shards ('shards/shard-{000000..000009}.tar',
    'shards/shard-*.tar', several joined by '::'): one that names no file as written has each part made absolute
    (its braces and wildcards kept), so that a run on it resumes from any working directory too."""
    if name is None or Path(os.path.expanduser(name)).exists() or not any(c in name for c in "*?[{:"):
        return local_path(name)
    return "::".join(os.path.abspath(os.path.expanduser(part)) if part else part for part in name.split("::"))


def local_path(name: str | None) -> str | None:
    """`name` made absolute when it is a file or folder here (~ is the home folder), else unchanged (a Hub id,
    a missing path): a run or a manifest that saves it then works from any working directory. An empty name
    is refused: it would silently mean the current folder."""
    if name == "":
        raise ValueError("an empty path would mean the current folder: give the file or folder")
    if name is None:
        return None
    path = Path(os.path.expanduser(name))  # (a ~user that does not exist stays as typed: "no such file" follows)
    return str(path.resolve()) if path.exists() else name


def check_writable(path: str | Path, flag: str) -> None:
    """ValueError naming `flag` unless `path` (a file to be written) can be created: its folder is made
    and a temporary sibling written and removed, the only test that holds for read-only file systems,
    permissions and root alike; the folders made for the test are removed again (the writer makes them when it
    has the file to write), so a command that stops before it leaves none. Run it before expensive work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {flag} {path}: it is a directory: give a file path")
    target = Path(os.path.abspath(path))  # ".." resolved: mkdir of a/../b would make a too
    missing = [folder for folder in target.parents if not folder.exists()]  # deepest first
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = temp_sibling(target)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write {flag} {path}: {err.strerror or err}: choose a writable path") from None
    finally:
        for folder in missing:
            try:
                folder.rmdir()
            except OSError:
                break


class RunLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


def _holder(fd: int) -> str:
    """The lock file's "pid N on HOST". The holder writes it just after it locks: a start racing it reads
    an empty file for a moment, so an empty one is read again for up to a second."""
    for _ in range(20):
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if holder:
            return holder
        time.sleep(0.05)
    return "a process"


def file_identity(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, None if there is none (also where a folder on its way is a file now).
    A file this process holds open keeps its inode while it lives, so another file at the path (the folder deleted,
    moved or made again) has another."""
    try:
        found = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return found.st_dev, found.st_ino


@contextmanager
def run_lock(run_dir: str | Path, name: str = LOCK_FILE, holder_kind: str = "another training run"):
    """One training process per run directory: flock(2) on RUN/.lock, held while the block runs.

    The kernel releases the lock whenever the process ends, however it ends (an exception, SIGKILL,
    the OOM killer), so there is never a stale lock to clean up by hand. The file names the holder for
    the error message. It stays, except that a run which ends before writing anything removes its new
    folder, lock file included, while it holds the lock (train.prepare_run_dir): a process that locked
    the file just before it went sees it is no longer at its path and locks the current one instead, so
    two processes never hold two different files. flock is advisory: stmd_fast's commands respect it;
    other programs are not stopped by it."""
    import fcntl  # POSIX only: imported here so the package imports elsewhere

    path = Path(run_dir) / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _holder(fd)
            os.close(fd)
            raise RunLocked(f"{run_dir} is in use by {holder_kind} ({holder}): wait for it to end, "
                            f"or choose another --out") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was removed after we opened it: lock the one at the path now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
