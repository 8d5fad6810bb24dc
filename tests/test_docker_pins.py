"""docker/Dockerfile installs exactly the versions pyproject.toml pins, on a CUDA base, as a non-root user."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_pins() -> dict[str, str]:
    pins = {}
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, sep, version = requirement.partition("==")
        assert sep, f"pyproject dependency {requirement!r} is not pinned exactly"
        pins[normalize(name.strip())] = version.strip()
    return pins


def dockerfile_pins() -> dict[str, str]:
    run_text = "\n".join(
        line for line in DOCKERFILE.replace("\\\n", " ").splitlines() if line.lstrip().startswith("RUN")
    )
    pins: dict[str, str] = {}
    for name, version in re.findall(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", run_text):
        assert normalize(name) not in pins, f"{name} pinned twice in docker/Dockerfile"
        pins[normalize(name)] = version
    return pins


def test_dockerfile_pins_equal_pyproject_pins() -> None:
    assert dockerfile_pins() == pyproject_pins()


def test_project_itself_installs_without_unpinned_dependencies() -> None:
    assert "pip install --no-deps -e ." in DOCKERFILE and "pip check" in DOCKERFILE


def test_cuda_base_python_version_and_non_root_user() -> None:
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", DOCKERFILE, flags=re.M)
    assert base and base.group(1).startswith("nvidia/cuda:") and "devel" in base.group(1)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", DOCKERFILE, flags=re.M)
    python = re.search(r"python(3\.\d+) -m venv", DOCKERFILE).group(1)
    assert PYPROJECT["project"]["requires-python"] == f">={python},<3.{int(python.split('.')[1]) + 1}"
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, flags=re.M)
    assert users and users[-1] not in ("root", "0")
