"""Every file a run touches: what it reads, what it writes, and writing without losing data.

The rules, each pinned by tests/test_faults.py:

* Reads are regular files only. A FIFO would block for ever, /dev/zero never ends, and a
  folder or device is never what the user meant.
* A write never lands on a file the run reads (input model, its external data, calibration
  data, plans, sensitivity tables), never on another output of the same run, and never on
  anything that is not a regular file (a device, a FIFO, a folder). Paths are compared by
  what they point to: symlinks, relative paths and hard links to one file are one file.
* Every write is staged in the target's folder and renamed into place, so the target is
  either the old file or the complete new one. A staging entry's name carries the writer's
  process id; one left behind by a killed run is removed by the next run writing there.
* New files get 0666 minus the umask, as any other tool's output; a replaced file keeps its
  mode.
"""
from __future__ import annotations

import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OnnxPruneError

STAGING_PREFIX = ".onnxprune-"
# Staging entries without a process id come from versions before the id was recorded; they
# are removed once they are clearly abandoned.
_LEGACY_STAGING_AGE_S = 3600

STDOUT = "-"  # a report written to standard output instead of a file

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _label(role: str, path) -> str:
    return f"{role} {path}" if role else str(path)


def regular_file(path, role: str = "") -> Path:
    """`path` if it is a readable regular file (through symlinks), else a one-line error."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise OnnxPruneError(f"{_label(role, p)}: no such file") from None
    except OSError as exc:
        raise OnnxPruneError(f"{_label(role, p)}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise OnnxPruneError(f"{_label(role, p)}: is a directory, expected a file")
    if not stat.S_ISREG(st.st_mode):
        raise OnnxPruneError(f"{_label(role, p)}: is {_kind(st.st_mode)}, not a regular file")
    if not os.access(p, os.R_OK):
        raise OnnxPruneError(f"{_label(role, p)}: not readable")
    return p


def available_memory() -> int | None:
    """Bytes of memory the system can still give a process (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# Which paths a run reads and writes


def _identity(path: Path) -> tuple:
    """What a path designates: its inode when it exists, else its absolute resolved path."""
    try:
        st = path.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(path.resolve()))


@dataclass
class RunFiles:
    """The files one run reads and writes, checked against each other before any work is done.

    `reads` and `writes` hold (role, path) pairs; the role is what the user typed to name
    the file (`--report`, `-o`, `input model`) so that an error names the flag at fault.
    """

    reads: list[tuple[str, Path]] = field(default_factory=list)
    writes: list[tuple[str, Path]] = field(default_factory=list)
    folders: list[tuple[str, Path]] = field(default_factory=list)  # folders the run writes inside

    def read(self, role: str, path) -> None:
        """Record a file or folder the run reads (a folder's files count, not its subfolders)."""
        p = Path(path)
        self.reads.append((role, p))
        if p.is_dir():
            self.reads.extend((role, child) for child in sorted(p.iterdir()) if child.is_file())

    def write(self, role: str, path) -> None:
        if path is not None and str(path) != STDOUT:
            self.writes.append((role, Path(path)))

    def write_folder(self, role: str, path) -> None:
        """Record a folder the run creates files in (a training checkpoint): it may exist, as a
        folder, and must hold none of the files the run reads or writes elsewhere."""
        if path is not None:
            self.folders.append((role, Path(path)))

    def check(self) -> None:
        """Refuse, in one line, any write that would damage a file or land on something odd."""
        for role, folder in self.folders:
            if folder.exists() and not folder.is_dir():
                raise OnnxPruneError(f"{_label(role, folder)}: is a file; give a folder (it is created if absent)")
            parent = folder.resolve().parent
            if not parent.is_dir():
                raise OnnxPruneError(f"{_label(role, folder)}: folder {parent} does not exist")
            inside = folder.resolve()
            for other_role, path in self.reads + self.writes:
                resolved = path.resolve()
                if resolved == inside or inside in resolved.parents:
                    raise OnnxPruneError(f"{_label(role, folder)}: holds {other_role} {path}; give the training "
                                         "state a folder of its own")
        read_ids = {}
        for role, path in self.reads:
            read_ids.setdefault(_identity(path), (role, path))
        written: dict[tuple, tuple[str, Path]] = {}
        for role, path in self.writes:
            check_write_target(path, role)
            ident = _identity(path)
            if ident in read_ids:
                other_role, other = read_ids[ident]
                same = "" if str(other) == str(path) else f" ({other})"
                raise OnnxPruneError(f"{_label(role, path)}: is the {other_role}{same}, which this run reads; "
                                     "choose another path")
            if ident in written:
                other_role, other = written[ident]
                raise OnnxPruneError(f"{_label(role, path)}: {other_role} writes the same file; give each "
                                     "output its own path")
            written[ident] = (role, path)


def check_write_target(path, role: str = "") -> Path:
    """`path` if a file can be written there: absent or a regular file, in a writable folder."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OnnxPruneError(f"{_label(role, p)}: cannot write ({exc.strerror or exc})") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        what = _kind(st.st_mode)
        hint = "; --dry-run writes no model" if stat.S_ISCHR(st.st_mode) and role in ("-o", "output") else ""
        raise OnnxPruneError(f"{_label(role, p)}: is {what}; give the path of a regular file{hint}")
    folder = _folder(p)
    if not folder.is_dir():
        raise OnnxPruneError(f"{_label(role, p)}: folder {folder} does not exist")
    _probe(folder, p, role)
    return p


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _probe(folder: Path, target: Path, role: str) -> None:
    """Create and remove a staging file: the only test that sees read-only mounts, immutable
    folders and pseudo file systems the way the real write will."""
    probe = folder / _staging_name()
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OnnxPruneError(f"{_label(role, target)}: cannot write in {folder} ({exc.strerror or exc})") from None


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _staging_name() -> str:
    return f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True
    return True


def sweep_stale_staging(folder) -> list[Path]:
    """Remove staging entries left in `folder` by runs that no longer exist; returns them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        pid_text = entry.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and "-" in entry.name[len(STAGING_PREFIX):]:
            stale = int(pid_text) != os.getpid() and not _pid_alive(int(pid_text))
        else:
            try:
                stale = time.time() - entry.lstat().st_mtime > _LEGACY_STAGING_AGE_S
            except OSError:
                continue
        if stale:
            _remove(entry)
            removed.append(entry)
    return removed


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        try:
            entry.unlink()
        except OSError:
            pass


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # read it by setting it, then put it back
    os.umask(mask)
    return mask


def _mode_for(target: Path) -> int:
    try:
        st = target.stat()
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~_umask()


def write_files(targets: Iterable, write: Callable[[list[Path]], None], role: str = "",
                needed_bytes: int = 0) -> list[Path]:
    """Write files of one folder atomically: `write(staged)` fills staged copies (same names,
    in a staging folder beside the targets), and only once all are complete are they renamed
    over the targets, in the given order (put a file that refers to the others last).

    `needed_bytes` is checked against the free space of the folder first.
    """
    targets = [Path(t) for t in targets]
    first = targets[0]
    folder = _folder(first)
    for target in targets:
        check_write_target(target, role)
    sweep_stale_staging(folder)
    if needed_bytes:
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if free is not None and needed_bytes > free:
            raise OnnxPruneError(f"{_label(role, first)}: needs about {mib(needed_bytes)}, and {folder} has "
                                 f"{mib(free)} free")
    staging = folder / _staging_name()
    try:
        staging.mkdir(mode=0o700)
        staged = [staging / target.name for target in targets]
        write(staged)
        for path, target in zip(staged, targets):
            os.chmod(path, _mode_for(target))
        for path, target in zip(staged, targets):
            os.replace(path, target)
    except OSError as exc:
        raise OnnxPruneError(f"{_label(role, first)}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


def write_file(path, write: Callable[[Path], None], role: str = "", needed_bytes: int = 0) -> Path:
    """Write one file atomically (see write_files)."""
    return write_files([path], lambda staged: write(staged[0]), role, needed_bytes)[0]


def write_text(path, text: str, role: str = "") -> Path:
    data = text.encode()
    return write_file(path, lambda staged: staged.write_bytes(data), role, needed_bytes=len(data))
