"""Write the lock from the environment this interpreter runs in: `python requirements/freeze.py > requirements/lock.txt`.

The environment should be one that just passed the tests with the newest allowed versions (`make test-latest`
builds it as .venv-latest; `make lock` runs this there). Every installed distribution is pinned exactly, pip and
setuptools included; the editable surgeon itself and the data packages of requirements/data.txt are left out.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Pins that hold only where pyproject.toml asks for them.
MARKERS = {"triton": "platform_machine == 'x86_64'"}


def _name(requirement: str) -> str:
    return requirement.split("==", 1)[0].strip().lower().replace("_", "-")


def data_packages() -> set[str]:
    lines = (HERE / "data.txt").read_text().splitlines()
    return {_name(line) for line in lines if line.strip() and not line.startswith("#")}


def main() -> None:
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout.splitlines()
    skip = data_packages()
    pins = sorted((line for line in frozen if "==" in line and _name(line) not in skip), key=_name)
    print("# Exact versions of every dependency of surgeon[test,dev,ray], as tested by CI. Generated; do not edit.")
    print("# Refresh: `make lock` (builds .venv-latest with the newest allowed versions, runs the fast tests,")
    print("# freezes it here), then `make test`. See CONTRIBUTING.md.")
    print(f"# Generated {datetime.date.today()} with Python {platform.python_version()} on {platform.machine()}.")
    for line in pins:
        marker = MARKERS.get(_name(line))
        print(f"{line} ; {marker}" if marker else line)


if __name__ == "__main__":
    main()
