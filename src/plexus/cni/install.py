"""Install the CNI shim as ``plexus`` and ``plexus-ipam`` into plugin directories.

    python -m plexus.cni.install [DIR ...]     (default: /opt/cni/bin /usr/lib/cni)

The ``#!`` line names the real interpreter (not a pyenv or ``env`` shim, which costs ~80 ms per
call) with ``-IS``: isolated mode, no site-packages. Linux passes everything after the
interpreter as a single argument, so the flags are one word.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
NAMES = ("plexus", "plexus-ipam")


def interpreter() -> str:
    return os.path.realpath(sys.executable)


def install(dirs: list[str]) -> list[Path]:
    source = (Path(__file__).parent / "shim.py").read_text()
    script = f"#!{interpreter()} -IS\n{source}"
    written = []
    for d in dirs:
        Path(d).mkdir(parents=True, exist_ok=True)
        for name in NAMES:
            target = Path(d) / name
            tmp = target.with_name(f".{name}.tmp")
            tmp.write_text(script)
            tmp.chmod(0o755)
            tmp.replace(target)  # atomic: a runtime never executes half a file
            written.append(target)
    return written


def main() -> None:
    for path in install(sys.argv[1:] or list(DEFAULT_DIRS)):
        print(path)


if __name__ == "__main__":
    main()
