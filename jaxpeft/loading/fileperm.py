"""File permissions for files the library writes (imports the standard library only): safetensors creates its
files 0600 and tempfile its folders 0700; published files get what a normally created file would have."""
from __future__ import annotations

import os


def umask() -> int:
    """The process umask, read without changing it (Linux /proc), else the common 022."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def publish_file(path: str | os.PathLike) -> None:
    """chmod a written file to 0666 minus the umask."""
    os.chmod(path, 0o666 & ~umask())


def publish_dir(path: str | os.PathLike) -> None:
    """chmod a written folder to 0777 minus the umask."""
    os.chmod(path, 0o777 & ~umask())
