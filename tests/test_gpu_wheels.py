"""scripts/gpu_wheels.sh carries exactly what the GPU machine's image lacks: with the image's packages
(scripts/gpu_image_packages.txt) the carried wheels cover every requirement of the carried distributions and every
third-party module the project imports at module level, at the project's pins, without torch. Runs on a clean
clone (no network, no gpu-wheels/): it reads the script's list and this environment's installed metadata."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib

from tests.conftest import ROOT


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried() -> dict[str, str]:
    """Distribution -> pinned version, as scripts/gpu_wheels.sh lists them (BINARY_WHEELS and DEEPSPEED)."""
    text = (ROOT / "scripts" / "gpu_wheels.sh").read_text()
    block = re.search(r"BINARY_WHEELS=\((.*?)\)", text, flags=re.DOTALL).group(1)
    specs = re.findall(r"^\s*([A-Za-z0-9_.-]+==[^\s#]+)", block, flags=re.MULTILINE)
    specs.append(re.search(r"^DEEPSPEED=(\S+)", text, flags=re.MULTILINE).group(1))
    return {_normalise(spec.split("==")[0]): spec.split("==")[1] for spec in specs}


def image_packages() -> set[str]:
    lines = (ROOT / "scripts" / "gpu_image_packages.txt").read_text().splitlines()
    return {_normalise(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def requirements(distribution: str) -> set[str]:
    """The distribution's unconditional requirements (extras left out), by name."""
    names = set()
    for requirement in metadata.requires(distribution) or []:
        if "extra ==" in requirement:
            continue
        names.add(_normalise(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]))
    return names


def test_carried_wheels_are_the_project_pins_and_never_torch():
    wheels = carried()
    pins = {_normalise(dep.split("==")[0]): dep.split("==")[1]
            for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name in ("deepspeed", "megatron-core", "datasets"):
        assert wheels[name] == pins[name], name
    assert "torch" not in wheels
    # The image's own packages stay in charge, but for typing-extensions: pydantic-core needs >= 4.14.1 and the
    # image's version was never read, so the carried one (WORK/site, ahead of the image on sys.path) is used.
    assert set(wheels) & image_packages() == {"typing-extensions"}
    for name, version in wheels.items():  # the metadata read below is that of the carried version
        assert metadata.version(name) == version, name


def test_carried_wheels_and_the_image_cover_every_requirement():
    available = image_packages() | set(carried())
    missing = {name: sorted(requirements(name) - available) for name in carried()}
    assert not any(missing.values()), missing


def test_every_third_party_module_the_project_imports_is_on_the_gpu_machine():
    modules = set()
    for package in ("l2e_dist", "launcher"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"l2e_dist", "launcher"}
    assert {"torch", "megatron", "numpy"} <= third_party
    owners = metadata.packages_distributions()
    available = image_packages() | set(carried())
    missing = {m: owners.get(m) for m in third_party if not {_normalise(d) for d in owners.get(m, [])} & available}
    assert not missing, missing
