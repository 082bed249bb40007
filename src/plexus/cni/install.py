"""Install the CNI shim as ``plexus`` and ``plexus-ipam`` into plugin directories.

    python -m plexus.cni.install [DIR ...]     (default: /opt/cni/bin /usr/lib/cni)

Where a C compiler is present, each plugin is the compiled shim (``shim.c``, ~1 ms to start,
against ~7 ms for the Python interpreter): it forwards the environment and stdin to the agent,
which runs the Python shim's validation. Otherwise each plugin is a two-line Python stub that
imports the shim from ``DIR/.plexus-cni/``, where it was compiled at install time: a script is
compiled on every run (~4-9 ms for the shim), an imported module's bytecode is loaded from its
cache. The ``#!`` line names the real interpreter (not a
pyenv or ``env`` shim, which costs ~80 ms per call) with ``-IS``: isolated mode, no
site-packages. Linux passes everything after the interpreter as one argument, so the flags are
one word.
"""

from __future__ import annotations

import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

from plexus.cni import spec

DEFAULT_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
NAMES = ("plexus", "plexus-ipam")
MODULE = "plexus_cni_shim"
SPEC_MODULE = "plexus_cni_spec"  # plexus/cni/spec.py, which the shim imports by this name
LIBDIR = ".plexus-cni"


def interpreter() -> str:
    return os.path.realpath(sys.executable)


def _write(target: Path, text: str, mode: int) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(target)  # atomic: a runtime never executes half a file


def compile_shim(target: Path) -> bool:
    """Build shim.c into ``target``; False (and the Python shim is used) without a compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return False
    tmp = target.with_name(f".{target.name}.tmp")
    source = Path(__file__).parent / "shim.c"
    defines = [
        "-DPLEXUS_CNI_VERSIONS=" + ", ".join(f'"{v}"' for v in spec.VERSIONS),
        f'-DPLEXUS_CNI_SOCKET="{spec.DEFAULT_SOCKET}"',
    ]
    done = subprocess.run(
        [cc, "-O2", *defines, "-o", str(tmp), str(source)],
        capture_output=True, text=True, timeout=120,
    )
    if done.returncode != 0:
        print(
            f"plexus: compiling the CNI shim failed, using the Python one:\n{done.stderr}",
            file=sys.stderr,
        )
        return False
    tmp.replace(target)
    return True


def install(dirs: list[str], compiled: bool = True) -> list[Path]:
    """``compiled=False`` installs the Python shim even where a compiler exists."""
    here = Path(__file__).parent
    modules = {MODULE: (here / "shim.py").read_text(), SPEC_MODULE: (here / "spec.py").read_text()}
    written = []
    for d in dirs:
        lib = Path(d) / LIBDIR
        lib.mkdir(parents=True, exist_ok=True)
        for module, source in modules.items():
            _write(lib / f"{module}.py", source, 0o644)
            # Unchecked hash-based bytecode: loaded without even a stat of the source.
            py_compile.compile(
                str(lib / f"{module}.py"),
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
        stub = (
            f"#!{interpreter()} -IS\nimport sys\nsys.path.insert(0, {str(lib)!r})\n"
            f"from {MODULE} import main\nmain()\n"
        )
        binary = lib / "plexus-cni"
        native = compiled and compile_shim(binary)
        for name in NAMES:
            target = Path(d) / name
            if native:
                tmp = target.with_name(f".{name}.tmp")
                shutil.copyfile(binary, tmp)
                tmp.chmod(0o755)
                tmp.replace(target)
            else:
                _write(target, stub, 0o755)
            written.append(target)
    return written


def main() -> None:
    for path in install(sys.argv[1:] or list(DEFAULT_DIRS)):
        print(path)


if __name__ == "__main__":
    main()
