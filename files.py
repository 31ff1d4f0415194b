"""Writing safely, for every stage: atomic files (a crash never leaves half a file), append-only shards (the resume
state of sampling), one writer per output folder (a lock held while a stage runs), and a save that fails for want
of space or permission stopping with what was kept instead of a traceback. runs.py builds the run folder's life
cycle on these."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import fail


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path next to `path` (`path` + ".tmp") for the caller to write, then rename it over `path`:
    a crash never leaves half a file behind. A writer that picks its format from the suffix (matplotlib's
    savefig) must be given the format. On an error the temp file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


# The lock file a stage holds in its output folder while it runs (lock_output_dir). Not run_all.sh's $RUN/.lock:
# the stages run_all.sh starts inherit that one, and a second lock on the same file would refuse them.
LOCK_FILE = ".kit_stage.lock"


def _write_probe(folder: Path) -> None:
    """Create and remove an empty file in `folder` (raises OSError when the folder takes no new file)."""
    fd, name = tempfile.mkstemp(prefix=".kit_write_test.", dir=folder)
    os.close(fd)
    os.unlink(name)


def check_writable(path, flag: str = "--output_dir") -> None:
    """`path` is a folder, or can be made as one, and takes a new file: a file in the way, a read-only folder
    or disk stop here, with the flag to change, before any compute. (A disk that is merely full is found when
    a save fails: write_guard says what was kept.)"""
    path = Path(path)
    if path.exists() and not path.is_dir():
        fail(f"{flag} {path} is a file, not a folder; choose another {flag}.")
    folder = path
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not folder.is_dir():
        fail(f"{flag} {path}: {folder} is a file, so no folder can be made there; choose another {flag}.")
    try:
        _write_probe(folder)
    except OSError as err:
        fail(f"{flag} {path}: cannot write in {folder} ({err.strerror or err}). Choose a folder you can write "
             f"to, or fix its permissions (a read-only disk or folder).")


_HELD_LOCKS: dict[tuple, object] = {}   # lock file (device, inode) -> its open file, kept open (so locked) until exit


def is_main_process() -> bool:
    """Rank 0, or no launcher at all: torchrun (accelerate launch) sets RANK in every process it starts. For
    the checks that run before the Accelerator exists."""
    return os.environ.get("RANK", "0") == "0"


def lock_output_dir(path, stage: str, flag: str = "--output_dir", lock_path=None, create: bool = True) -> None:
    """An exclusive flock on `path`/LOCK_FILE (or `lock_path`), held until this process exits (the kernel
    releases it then, however the process ends, so a killed stage leaves no stale lock). A second process on
    the same folder stops at once, naming the PID that holds it. Under accelerate launch only the main process
    calls this (the ranks share one folder). Taking it again in the same process is a no-op. create=False: lock
    only a folder that exists already (a stage's first check, which must leave nothing behind when a later
    check fails; it locks again when it makes the folder)."""
    import fcntl
    path = Path(path)
    lock_path = Path(lock_path) if lock_path else path / LOCK_FILE
    check_writable(path, flag)
    if not create and not lock_path.parent.is_dir():
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+")
    # Keyed by the file itself, not its path: a folder moved while this process holds it is still held. (An
    # open file keeps its inode, so no other file can take the number meanwhile.)
    status = os.fstat(handle.fileno())
    key = (status.st_dev, status.st_ino)
    if key in _HELD_LOCKS:
        handle.close()
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            handle.close()  # a file system without locks (ENOLCK): say so and go on unguarded
            print(f"[{stage}] warning: cannot lock {lock_path} ({err.strerror}); nothing stops a second writer",
                  file=sys.stderr)
            return
        handle.seek(0)
        holder = handle.read().strip().split(maxsplit=1)
        handle.close()
        if holder:
            who = f"PID {holder[0]}" + (f" ({holder[1]})" if len(holder) > 1 else "")
        else:  # it took the lock a moment ago and has not written its PID yet
            who = "a process that is just starting"
        fail(f"{flag} {path} is in use by another process: {who} holds its lock {lock_path}. Two writers would "
             f"mix two runs in one folder. Wait for it to finish or stop it (kill {holder[0] if holder else 'it'}), "
             f"or choose another {flag}.")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {stage} " + " ".join(sys.argv[1:])[:300] + "\n")
    handle.flush()
    _HELD_LOCKS[key] = handle


# Below this many free bytes after a failed write, the disk is taken to be full: torch.save reports ENOSPC as
# RuntimeError("... unexpected pos ...") and safetensors as SafetensorError, neither with an errno.
FULL_DISK_BYTES = 64 << 20


def write_failure(err: BaseException, folder) -> str | None:
    """Why writing into `folder` failed, when the cause is the disk or the folder (full, quota, read-only,
    permission), else None (a bug: the caller re-raises it)."""
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{err.strerror} ({err.filename or folder})"
    full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        text in str(err) for text in ("No space left on device", "os error 28", "Disk quota exceeded"))
    try:
        free = shutil.disk_usage(next(p for p in [Path(folder), *Path(folder).parents] if p.exists())).free
    except (OSError, StopIteration):
        free = None
    if full or (free is not None and free < FULL_DISK_BYTES and not isinstance(err, (KeyError, TypeError))):
        left = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
        return f"no space left on the disk of {folder}{left}"
    return None


@contextlib.contextmanager
def write_guard(folder, what: str, kept):
    """Run a save; when it fails for want of space or permission (write_failure), stop with an error line that
    says what failed and what was kept (`kept`: text, or a function giving it once the failure happened)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - write_failure decides; anything else is re-raised as it was
        reason = write_failure(err, folder)
        if reason is None:
            raise
        fail(f"writing {what} failed: {reason}. {kept() if callable(kept) else kept}")


def read_jsonl(path, fix: str) -> list[dict]:
    """The records of a JSON-lines file a stage wrote (metrics.jsonl); [] when it is absent. A line cut short (a
    run killed while writing it) is skipped; bytes that are not UTF-8 text are no such line (the stages write
    ASCII JSON): the file is named with `fix` and the run stops."""
    path = Path(path)
    rows = []
    if path.exists():
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            fail(f"{path}: not UTF-8 text (byte {err.start}), so not the metrics a stage wrote. " + fix)
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                rows.append(record)
    return rows


def read_shard(path) -> dict[str, dict]:
    """Records by id of an append-only JSONL shard (the resume state of rollout_sft.py's sampling and of the
    teacher). A torn or unreadable line (a crash during a write) is dropped and the file rewritten without it,
    so the next append starts on a clean line; those records are made again."""
    path = Path(path)
    if not path.exists():
        return {}
    records, good_lines, bad = {}, [], 0
    for line in path.read_text().splitlines(keepends=True):
        try:
            if not line.endswith("\n"):
                raise ValueError("torn line")
            record = json.loads(line)
            records[str(record["id"])] = record
            good_lines.append(line)
        except (ValueError, KeyError, TypeError):
            bad += 1
    if bad:
        print(f"[shard] {path}: dropped {bad} unreadable line(s) (a write cut short); those are made again", flush=True)
        write_text_atomic(path, "".join(good_lines))
    return records


def append_shard(path, records: list[dict]) -> None:
    """One write, flushed and fsynced: once this returns the records survive a crash."""
    with Path(path).open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
