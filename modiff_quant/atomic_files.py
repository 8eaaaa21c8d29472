"""Files written all at once or not at all: a reader (a load, the next run) never sees half a file,
and a failure leaves the old content or nothing, never an empty or truncated file.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_file(path: Path, content: bytes) -> None:
    """Write `content` beside `path`, then rename it over `path` (keeping its permissions)."""
    staged = sibling(path)
    try:
        write_durably(staged, content)
        if path.exists():
            shutil.copymode(path, staged)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Every file written in full before any is published: a new folder is written beside its
    place and renamed into it; in an existing one the files are written beside their places, then
    each renamed over its old version, in the order given (put the file that vouches for the
    others, such as a manifest of their checksums, last)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    fresh = not folder.is_dir()
    staging = sibling(folder) if fresh else folder
    written = {name: staging / name if fresh else sibling(folder / name) for name in files}
    try:
        if fresh:
            staging.mkdir()
        for name, content in files.items():
            write_durably(written[name], content)
        if fresh:
            staging.rename(folder)
        else:
            for name, path in written.items():
                os.replace(path, folder / name)
    except BaseException:
        if fresh:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            for path in written.values():
                path.unlink(missing_ok=True)
        raise


def sibling(path: Path) -> Path:
    """A hidden temporary name next to `path`, unique to this write."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def write_durably(path: Path, content: bytes) -> None:
    """On disk before the rename that publishes it, so a crash cannot publish an empty file."""
    with path.open("xb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())
