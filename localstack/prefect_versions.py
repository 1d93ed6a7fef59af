"""The Prefect versions this project supports, each locked, and a virtualenv for each.

A Prefect client talks best to a server of its own version: before 3.6.14 a newer
client cannot even open the server's event stream, so the flows' own task runs would
never show in the UI. The worker therefore runs the Prefect of the server it serves.
The default install (`uv.lock`) is the newest; for an older server, `make install
PREFECT_VERSION=3.4.25` (or the image's `PREFECT_VERSION` build argument) installs the
locked requirements of that version from `prefect-versions/<version>.txt` instead.

Those files are made here, from `pyproject.toml` and the pins each server needs to
start at all (measured: older servers answer every route but `/api/health` with 500
under a newer FastAPI):

    python -m localstack.prefect_versions compile     # rewrite prefect-versions/*.txt
    python -m localstack.prefect_versions venv 3.4.25 # a cached venv, prints its python

The test suite's support matrix runs a real server of each version from such a venv and
the flows with that venv's client.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from deploy import PREFECT_VERSIONS_DIR

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENVS_DIR = PROJECT_ROOT / ".local" / "prefect-versions"

# What each supported server needs besides the project's own requirements.
_OLD_FASTAPI = ("fastapi==0.136.3", "importlib_metadata")
EXTRA_PINS: dict[str, tuple[str, ...]] = {
    "3.1.15": _OLD_FASTAPI,
    "3.4.25": _OLD_FASTAPI,
    "3.6.29": _OLD_FASTAPI,
    "3.9.1": (),
}
SUPPORTED_VERSIONS = tuple(EXTRA_PINS)
NEWEST = SUPPORTED_VERSIONS[-1]


def requirements_file(version: str) -> Path:
    if version not in EXTRA_PINS:
        raise SystemExit(
            f"Prefect {version} is not a supported version; supported: {', '.join(SUPPORTED_VERSIONS)}"
        )
    return PREFECT_VERSIONS_DIR / f"{version}.txt"


def uv() -> str:
    """The uv of the project's venv (a dev dependency), or one on PATH."""
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.exists() else shutil.which("uv")
    if not found:
        raise SystemExit("uv is not installed: run `make install` first")
    return found


def compile_requirements(version: str) -> Path:
    target = requirements_file(version)
    target.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        constraints = Path(scratch) / "constraints.txt"
        extras = Path(scratch) / "extras.in"
        pins = [pin for pin in EXTRA_PINS[version] if "==" in pin]
        constraints.write_text("\n".join([f"prefect=={version}", *pins]) + "\n")
        extras.write_text("\n".join(pin for pin in EXTRA_PINS[version] if "==" not in pin) + "\n")
        subprocess.run(
            [
                uv(),
                "pip",
                "compile",
                "--quiet",
                "--no-header",
                "--python-version",
                "3.11",
                "pyproject.toml",
                str(extras),
                "--constraint",
                str(constraints),
                "--output-file",
                str(target),
            ],
            cwd=PROJECT_ROOT,
            check=True,
        )
    body = target.read_text().replace(str(extras), "extra pins").replace(str(constraints), "constraints")
    target.write_text(
        f"# Prefect {version} and the project's requirements, locked for Python 3.11.\n"
        "# Made by `python -m localstack.prefect_versions compile`; do not edit.\n" + body
    )
    return target


def venv_python(version: str, root: Path = VENVS_DIR) -> Path:
    """A virtualenv with Prefect `version` and the project installed, made once and kept
    while its requirements file is unchanged; returns its python."""
    requirements = requirements_file(version)
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    home = root / version
    python = home / "bin" / "python"
    stamp = home / ".installed"
    root.mkdir(parents=True, exist_ok=True)
    # Test processes running side by side may ask for the same venv: one makes it.
    with open(root / f"{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == digest and python.exists()):
            _make_venv(home, python, requirements)
            stamp.write_text(digest)
    return python


def _make_venv(home: Path, python: Path, requirements: Path) -> None:
    shutil.rmtree(home, ignore_errors=True)
    environment = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    subprocess.run(
        [uv(), "venv", "--quiet", "--python", sys.executable, str(home)], check=True, env=environment
    )
    for arguments in (["-r", str(requirements)], ["--no-deps", "-e", str(PROJECT_ROOT)]):
        subprocess.run(
            [uv(), "pip", "install", "--quiet", "--python", str(python), *arguments],
            check=True,
            env=environment,
        )


def run_with_client(
    version: str,
    arguments: list[str],
    *,
    api_url: str,
    database_url: str | None = None,
    home: Path,
    timeout: float = 600,
    environment: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python ARGUMENTS...` in the venv of `version`, pointed at a server (and a database):
    client-side work done with the Prefect that matches the server."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "MAINTENANCE_", "VIRTUAL_ENV"))
    }
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
        **({"MAINTENANCE_DATABASE_URL": database_url} if database_url else {}),
        **(environment or {}),
    )
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [str(venv_python(version)), *arguments],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localstack.prefect_versions", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("compile", help="rewrite prefect-versions/<version>.txt for every supported version")
    make_venv = commands.add_parser("venv", help="make (or reuse) the venv of one version; prints its python")
    make_venv.add_argument("version", choices=SUPPORTED_VERSIONS)
    args = parser.parse_args(argv)
    if args.command == "compile":
        for version in SUPPORTED_VERSIONS:
            print(compile_requirements(version).relative_to(PROJECT_ROOT))
        return 0
    print(venv_python(args.version))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
