"""The generated admin API key's file: the key goes there, never to the log.

A node on loopback without a configured ``api_key`` makes one and writes it
to a file only its user can read (mode 0600); the log names the file. On a
fixed admin port the file outlives the node and the next node on that port
takes the key from it, so a developer's key stays the same from run to run
(``read_key`` trusts only a file this user owns that nobody else can read). The file is written under a fresh name and renamed into place, so a
file or symlink someone else planted at the path (the temp dir is shared)
is never written through: the rename replaces it, or fails.
"""

from __future__ import annotations

import os
import stat
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


#: Shorter content is not a key this module wrote (token_urlsafe(32): 43).
MIN_KEY_CHARS = 32


def read_key(path: str) -> str:
    """The key a previous node left at ``path``, or '' when there is none
    to trust: not a regular file (a symlink is not followed), not this
    user's, readable by others, or not a key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid()
                or st.st_mode & 0o077 or st.st_size > 1024):
            return ""
        key = os.read(fd, 1024).decode("ascii", "replace").strip()
    except OSError:
        return ""
    finally:
        os.close(fd)
    if len(key) < MIN_KEY_CHARS or not key.isprintable() or " " in key:
        return ""
    return key


def remove_key(path: str, key: str) -> None:
    """Remove ``path`` if it still holds ``key`` (a later node may own it now)."""
    try:
        with open(path) as fh:
            if fh.read().strip() != key:
                return
        os.unlink(path)
    except OSError:
        pass
