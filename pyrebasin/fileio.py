"""Atomic file writes, the one way pyrebasin writes a file: a reader never sees a half-written file,
a failed write leaves the old one intact, and a killed process leaves no temporary file behind."""
from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_torch_save",
           "atomic_save_safetensors", "check_target", "same_file", "discard_writes"]

# Linux: an unnamed file in the target's directory (O_TMPFILE), linked into place once written, so a
# process killed mid-write leaves nothing (the kernel frees the inode). Elsewhere a named temp file.
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_PROC_FD = "/proc/self/fd"
_DISCARD = contextvars.ContextVar("pyrebasin_discard_writes", default=False)


@contextlib.contextmanager
def discard_writes():
    """Within the block, every write through this module checks its target and then writes nothing
    (the ranks of a distributed run other than the writer: the same checks, no files)."""
    token = _DISCARD.set(True)
    try:
        yield
    finally:
        _DISCARD.reset(token)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_target(path: str | os.PathLike, what: str = "output") -> Path:
    """`path` can be written as a file: not a directory, no parent that is a file. Errors name it
    (IsADirectoryError / NotADirectoryError); nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {what} {path}: it is a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot write {what} {path}: {parent} is a file, not a directory")
            break
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when the two paths name one file (after resolving links; hard links too when both exist)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _enospc(path: Path, exc: BaseException) -> None:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        raise OSError(errno.ENOSPC, f"no space left on the device while writing {path}") from None


def _unnamed(directory: Path) -> int | None:
    """An O_TMPFILE descriptor in `directory`, or None where the OS or filesystem has none."""
    if not _O_TMPFILE or not os.path.isdir(_PROC_FD):
        return None
    try:
        return os.open(directory, _O_TMPFILE | os.O_RDWR, 0o666)  # the umask applies, as for open()
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None
        raise


def _link_into_place(fd: int, path: Path) -> None:
    source = f"{_PROC_FD}/{fd}"
    try:
        os.link(source, path, follow_symlinks=True)  # no file there yet: one step, nothing named in between
        return
    except FileExistsError:
        pass
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.link(source, tmp, follow_symlinks=True)  # named only for the instant before the rename
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_unnamed(fd: int, path: Path, write: Callable[[str], object]) -> None:
    try:
        # The callable gets a path (torch.save and savefig take one): the magic link reopens the
        # unnamed inode itself.
        write(f"{_PROC_FD}/{fd}")
        os.fsync(fd)
        try:
            _link_into_place(fd, path)
        except OSError as exc:  # a filesystem that refuses linkat on it: copy into a named temp
            if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOENT, errno.EOPNOTSUPP):
                raise
            os.lseek(fd, 0, os.SEEK_SET)
            with os.fdopen(os.dup(fd), "rb") as src:
                _write_named(path, lambda tmp: _copy(src, tmp))
    finally:
        os.close(fd)


def _copy(src, tmp: str) -> None:
    with open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)


def _write_named(path: Path, write: Callable[[str], object]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)` on a temporary file in `path`'s directory, then move it onto `path`.

    `write` must write the file at `tmp_path` itself, not through its own temporary beside it
    (safetensors' `save_file` does that: use `atomic_save_safetensors`). On Linux the temporary has
    no name until it is complete (O_TMPFILE), so a killed process leaves nothing behind; elsewhere
    it is a hidden `.name.*.tmp`, removed on any error. Errors name the path: a parent that is a file, a target that is a directory, a full disk (OSError ENOSPC)."""
    path = check_target(path)
    if _DISCARD.get():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise NotADirectoryError(f"cannot write {path}: a parent of it is a file ({exc.filename})") from None
    try:
        fd = _unnamed(path.parent)
        if fd is None:
            _write_named(path, write)
        else:
            _write_unnamed(fd, path, write)
    except BaseException as exc:
        _enospc(path, exc)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    import torch
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_safetensors(tensors, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file`, atomically (its own temp-and-rename would leave a named file
    behind a killed process); the file is serialised in memory first (one copy of its bytes)."""
    from safetensors.torch import save

    return atomic_write_bytes(path, save(dict(tensors), metadata=metadata))
