"""Where quantlm keeps its caches, and how it writes directories and files atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from quantlm.errors import QuantlmError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None


def quantlm_home() -> Path:
    """The cache root: ``$QUANTLM_HOME``, default ``~/.cache/quantlm``."""
    return Path(os.environ.get("QUANTLM_HOME") or Path.home() / ".cache" / "quantlm").expanduser()


_HELD: dict[str, int] = {}  # lock file -> how many times this process holds it


@contextlib.contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold ``.{name}.lock`` beside ``target`` while writing it: a second run into the same output (another
    process) gets a one-line error at once instead of racing on the same files. The lock is the operating
    system's (``flock``), so a killed run leaves nothing held (only the empty lock file, which the next run takes
    over and removes); the same process may take it again (nested)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    key = str(lock.resolve())
    if key in _HELD or fcntl is None:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    fd = _take_lock_file(lock)
    if fd is None:
        raise QuantlmError(
            f"another quantlm run is writing {target} (it holds {lock}): wait for it to finish, or choose another "
            "output"
        )
    _HELD[key] = 1
    try:
        remove_stale_temporaries(target)  # the holder cleans up after killed writers (and restores a lost output)
        yield
    finally:
        del _HELD[key]
        lock.unlink(missing_ok=True)  # before unlocking: a run that opened the old file sees it is gone
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _take_lock_file(lock: Path) -> int | None:
    """An open, exclusively locked descriptor of ``lock``, or None if another process holds it. The file is removed
    when released, so a lock taken on a file that was removed meanwhile is not a lock: check it is still there."""
    for _ in range(5):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed it between our open and our lock: take the new one
    return None


def default_work_dir(out: Path) -> Path:
    """Where a run into ``out`` keeps its resumable work unless told otherwise: ``.{name}.work`` beside it."""
    return out.parent / f".{out.name}.work"


def _inside(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` or lies inside it (both resolved, links followed)."""
    path, other = path.resolve(), other.resolve()
    return path == other or path.is_relative_to(other)


def check_output_paths(model_dir: Path, out: Path, work: Path) -> None:
    """Refuse outputs that would replace or delete the source model, or each other, before any work is done."""
    if _inside(model_dir, out):
        raise QuantlmError(
            f"--out {out} is (or holds) the source model {model_dir}: writing it would destroy the model being "
            "read; choose another output"
        )
    where = f"the work directory {work} (--work-dir; default .OUT.work beside the output)"
    if _inside(work, out) or _inside(out, work):
        raise QuantlmError(f"{where} and --out {out} overlap: choose a work directory outside the output")
    if _inside(model_dir, work):  # the work directory is removed at the end
        raise QuantlmError(f"{where} is (or holds) the source model {model_dir}: choose a work directory of its own")


def remove_stale_temporaries(target: Path) -> None:
    """Remove what an interrupted atomic write into ``target`` left beside it (call with the output lock held). A
    write killed between moving the old output aside and moving the new one in left the old one as the only copy:
    it is put back first."""
    olds = [
        p
        for p in target.parent.glob(f".{target.name}.old-*")
        if p.is_dir() and not p.is_symlink() and (p / "config.json").is_file()  # a whole earlier output
    ]
    if not target.exists() and not target.is_symlink() and len(olds) == 1:
        os.replace(olds[0], target)
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            _remove(leftover)


def _remove(path: Path) -> None:
    """Remove a directory tree, or a file or symbolic link (only the link: never what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success rename it to ``target``.

    On any error the temporary directory is removed and ``target`` is left exactly as it was. With
    ``overwrite`` an existing ``target`` is replaced only once the new one is complete. The output lock is held
    throughout, and temporaries that a killed earlier write left beside ``target`` are removed first.
    """
    target = Path(target)
    with output_lock(target):
        remove_stale_temporaries(target)
        with _atomic_directory(target, overwrite) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise FileExistsError(target)
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_file(path: Path, write: Callable[[str], None]) -> None:
    """Have ``write(tmp)`` write a file at a temporary path beside ``path``, then rename it to ``path``, under the
    output lock; on any error the temporary is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path):
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
