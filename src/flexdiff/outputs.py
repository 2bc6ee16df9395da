"""Where results go: checked before any work starts, one run per folder at a time, no debris left.

Every writing command checks its targets first (`check_file_target`, `check_folder_target`), so a
bad `--out` is refused in a second, not after an hour of sampling. Folder commands then run inside
`run_folder`: it takes a lock (filelock) so a second run into the same folder is refused, removes
temporary files a killed run left behind (atomic writes make `.NAME.XXXX.tmp` beside the target),
and on failure removes the folders it created if they stayed empty.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import FlexdiffError

LOCK_FILE = ".flexdiff.lock"


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_dir(folder: Path, option: str, target: Path) -> None:
    """`folder` exists: it must be a folder we can create files in (tried, not guessed: root ignores modes)."""
    if not folder.is_dir():
        raise FlexdiffError(f"{option} {target}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".flexdiff-probe.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise FlexdiffError(f"{option} {target}: cannot create files in {folder} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def check_file_target(path: Path | None, option: str = "--out") -> bool:
    """A file the command will write: not a folder, its folder creatable and writable.

    Returns True when a file is already there (the caller says that it is replaced)."""
    if path is None:
        return False
    path = Path(path)
    if path.is_dir():
        raise FlexdiffError(f"{option} {path}: is a folder; give a file name")
    _check_writable_dir(_first_existing(path.parent), option, path)
    return path.exists()


def check_folder_target(path: Path, option: str = "--out") -> None:
    """A folder the command will fill: not a file, and creatable where it does not exist yet."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FlexdiffError(f"{option} {path}: is a file; give a folder")
    _check_writable_dir(_first_existing(path), option, path)


_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # tempfile.mkstemp / mkdtemp with our prefix and suffix
_MAX_DEPTH = 4  # our runs write at most this deep; never walk a whole home folder given as --out


def is_stale_temp(name: str) -> bool:
    """Our temporary names: `.NAME.XXXXXXXX.tmp` (atomic files, mixture folders being built)."""
    return bool(_TEMP.match(name))


def clean_stale_temps(folder: Path) -> list[Path]:
    """Undo what killed runs left under `folder`; only safe while holding the folder's lock.

    Temporaries are removed. `.NAME.old` is a mixture folder being swapped out: removed when NAME
    is in place, renamed back when the swap was cut before NAME arrived."""
    removed = []
    base = len(Path(folder).parts)
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        if len(here.parts) - base >= _MAX_DEPTH:
            dirs[:] = []
        for name in list(dirs) + files:
            if is_stale_temp(name):
                target = here / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
                removed.append(target)
                if name in dirs:
                    dirs.remove(name)
            elif name.startswith(".") and name.endswith(".old") and name in dirs:
                live = here / name[1:-4]
                if live.exists():
                    shutil.rmtree(here / name, ignore_errors=True)
                    removed.append(here / name)
                else:
                    os.replace(here / name, live)
                dirs.remove(name)
    return removed


@contextmanager
def run_folder(path: Path, option: str = "--out") -> Iterator[Path]:
    """Hold `path` for one run: checked, created, locked, cleaned of stale temporaries.

    A second run into the same folder is refused at once. If the run fails, folders it created
    are removed again when nothing was written in them."""
    from filelock import FileLock, Timeout

    path = Path(path)
    check_folder_target(path, option)
    created = []
    p = path
    while not p.exists():
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    lock_path = path / LOCK_FILE
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FlexdiffError(f"{option} {path}: another flexdiff run is using this folder (it holds {lock_path}); "
                            "wait for it to finish or use another folder") from None
    ok = False
    try:
        clean_stale_temps(path)
        yield path
        ok = True
    finally:
        lock_path.unlink(missing_ok=True)  # we still hold it: nobody can be between acquire and this unlink
        lock.release()
        if not ok:
            for d in created:  # deepest first
                try:
                    d.rmdir()
                except OSError:
                    break  # not empty: the run wrote something worth keeping (a checkpoint, a cache)
