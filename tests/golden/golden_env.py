"""The Python environment the golden-output scripts (make_*_golden.py) run in: exact pinned
versions, in `tests/golden/.venv` unless KILN_GOLDEN_PYTHON names an interpreter. Standard library
only, so a script can bootstrap under any python3 before its pinned packages exist.

A script calls `run_pinned(main, __file__, requirements)` at the bottom: the first run installs
the pins into the venv and re-runs the script there; the re-run calls `main()`.
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VENV = HERE / ".venv"

# Set in the re-executed child so the bootstrap cannot loop.
_INNER = "_KILN_GOLDEN_INNER"


def pinned_versions(requirements):
    """{package: version} from a requirements file of `name==version` lines."""
    pins = {}
    for line in Path(requirements).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip()
    return pins


def check_versions(versions, requirements):
    """Exits unless every pinned package in `versions` has its pinned version (a local suffix
    such as `+cpu` aside), or KILN_GOLDEN_ALLOW_VERSIONS=1."""
    wrong = {
        k: (versions[k], want)
        for k, want in pinned_versions(requirements).items()
        if k in versions and versions[k].split("+")[0] != want
    }
    if wrong and os.environ.get("KILN_GOLDEN_ALLOW_VERSIONS") != "1":
        sys.exit(
            f"error: versions differ from {requirements}: {wrong} (set KILN_GOLDEN_ALLOW_VERSIONS=1 to go on anyway)"
        )


def _bootstrap(script, requirements):
    python = os.environ.get("KILN_GOLDEN_PYTHON")
    if python:
        print(f"using KILN_GOLDEN_PYTHON={python}", flush=True)
    else:
        python = str(VENV / "bin" / "python")
        if not Path(python).exists():
            print(f"creating {VENV}", flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
            subprocess.run([python, "-m", "pip", "install", "--upgrade", "pip"], check=True)
        # pip does nothing when the pinned versions are already there.
        subprocess.run([python, "-m", "pip", "install", "-r", str(requirements)], check=True)
    env = dict(os.environ, **{_INNER: "1"})
    sys.exit(subprocess.run([python, str(Path(script).resolve())] + sys.argv[1:], env=env).returncode)


def run_pinned(main, script, requirements):
    """Runs `main()` inside the pinned environment, bootstrapping it first when needed."""
    if os.environ.get(_INNER) == "1":
        main()
    else:
        _bootstrap(script, requirements)
