"""Private file modes for state: databases and keys 0600, their directories 0700.

Why: the index, the control-plane database and the page keys tell (or are) what a
guest's memory holds; an unprivileged user on the host must not read them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["private_dir", "private_file"]


def private_dir(path: str | Path) -> Path:
    """Create ``path`` (and parents) 0700; tighten it to 0700 if it is ours and not a shared sticky dir."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = p.stat()
    # never chmod a directory an operator pointed us at that others share (/tmp, /var/tmp): sticky or not ours
    if st.st_uid == os.geteuid() and not st.st_mode & stat.S_ISVTX and stat.S_IMODE(st.st_mode) != 0o700:
        p.chmod(0o700)
    return p


def private_file(path: str | Path) -> Path:
    """Create ``path`` 0600 if missing (before SQLite opens it: its -wal and -shm copy its mode), else chmod 0600."""
    p = Path(path)
    os.close(os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    p.chmod(0o600)  # also tightens a file an older version created 0644
    return p
