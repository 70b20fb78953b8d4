"""The generated admin API key's file: the key goes there, never to the log.

A node on loopback without a configured ``api_key`` makes one per run and
writes it to a file only its user can read (mode 0600); the log names the
file. The file is written under a fresh name and renamed into place, so a
file or symlink someone else planted at the path (the temp dir is shared)
is never written through: the rename replaces it, or fails.
"""

from __future__ import annotations

import os
import tempfile

from .config import ConfigError


def write_key(path: str, key: str) -> None:
    """Write ``key`` to ``path``, readable by this user only.

    :raises ConfigError: the file cannot be written (one line, naming it).
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fanout-key-")   # mode 0600
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise ConfigError(f"cannot write the generated API key to {path}: "
                          f"{exc.strerror or exc}; set api_key or api_key_file") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def remove_key(path: str, key: str) -> None:
    """Remove ``path`` if it still holds ``key`` (a later node may own it now)."""
    try:
        with open(path) as fh:
            if fh.read().strip() != key:
                return
        os.unlink(path)
    except OSError:
        pass
