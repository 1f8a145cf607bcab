"""Compile lb's L7 hot modules with mypyc into a venv (run by deploy/install.sh).

Usage: PYTHON deploy/build_native.py SOURCE [OUT]

SOURCE is the directory holding the ``lb`` package to compile (a checkout,
or a venv's site-packages), OUT the directory the modules go to (default
``lb.l7.native.DIRECTORY`` of the interpreter running this, which must be
the one that will import them and must have mypy, whose mypyc does the
work, and a C compiler with Python's headers). The modules of
``lb.l7.native.MODULES`` are compiled from a copy of SOURCE in a temporary
directory, never in place; OUT is replaced whole, with a manifest of the
sources' hashes that ``import lb.l7`` checks (lb.l7.native). Exits non-zero
on any failure, leaving OUT as it was: lb then runs as plain Python.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    source = Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(source))
    # Import here, after SOURCE is on the path: the module list of the sources compiled.
    from lb.l7 import native

    out = Path(sys.argv[2]) if len(sys.argv) == 3 else native.DIRECTORY
    with tempfile.TemporaryDirectory(prefix="lb-native-") as tmpdir:
        tmp = Path(tmpdir)
        shutil.copytree(source / "lb", tmp / "lb", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        # Type information is all mypyc needs of the modules outside lb (bcc, pyroute2: none).
        (tmp / "mypy.ini").write_text("[mypy]\nignore_missing_imports = True\n")
        files = [f"lb/l7/{name}.py" for name in native.MODULES]
        # The copy first; then whatever PYTHONPATH brought mypy (install.sh --system).
        pythonpath = os.pathsep.join(p for p in (str(tmp), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": pythonpath, "MYPYC_OPT_LEVEL": "3"}
        run = subprocess.run([sys.executable, "-m", "mypyc", *files], cwd=tmp, env=env, capture_output=True,
                             text=True, check=False)
        if run.returncode != 0:
            print(run.stdout[-4000:], run.stderr[-4000:], sep="\n", file=sys.stderr)
            return 1
        suffix = native.ext_suffix()
        runtime = [Path(p) for p in glob.glob(str(tmp / f"*__mypyc{suffix}"))]
        modules = [tmp / "lb" / "l7" / f"{name}{suffix}" for name in native.MODULES]
        missing = [str(p) for p in modules if not p.exists()]
        if len(runtime) != 1 or missing:
            print(f"build_native: mypyc left {runtime} and lacks {missing}", file=sys.stderr)
            return 1
        new = out.with_name(out.name + ".new")
        shutil.rmtree(new, ignore_errors=True)
        (new / "lb" / "l7").mkdir(parents=True)
        shutil.copy2(runtime[0], new)
        for path in modules:
            shutil.copy2(path, new / "lb" / "l7")
        manifest = native.manifest(tmp / "lb" / "l7", runtime[0].name[: -len(suffix)])
        (new / native.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        new.rename(out)
    print(f"build_native: {len(modules)} modules compiled into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
