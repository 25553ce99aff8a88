"""Files written whole or not at all: a crash, a kill or a full disk leaves the old file or the new, never half."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from model import UserError


@contextmanager
def replacing(path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends, removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path, text: str) -> None:
    """`text` into `path`, whole or not at all; a failed write (a full disk) is one line saying what was kept."""
    path = Path(path)
    try:
        with replacing(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as e:
        kept = "the earlier one is kept" if path.exists() else "nothing was written"
        raise UserError(f"could not write {path}: {e.strerror or e}; {kept}") from None
