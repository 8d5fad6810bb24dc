"""The L2E level per Pythia size survives the L2E overlay: configs/l2e/l2e.yaml switches L2E on and leaves each
size's inhibit_ratio and reg_lambda alone. The paper's levels (70M p 0.01 / lambda 1e-9, 410M p 0.02, 2.8B
p 0.03 / lambda 1e-11) are exact; the other sizes follow the interpolation their config states (linear in
log(parameters) for p, log-linear for lambda, held at 70M's level below it and 2.8B's above it), recomputed here from each size's
parameter count. Every l2e-pretrain / torchrun / deepspeed / sbatch / mpirun command line with --config in
README.md and docs/pythia.md is parsed, and its effective l2e section checked, in-process and through
`--print-config`."""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from l2e_dist.config import config_to_dict, load_config
from tests.conftest import ROOT

SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
POLYPYTHIA_ONLY = ("14m", "31m")  # no -deduped models
PAPER = {"70m": (0.01, 1e-9), "410m": (0.02, None), "2.8b": (0.03, 1e-11)}  # None: the paper gives no lambda
LAUNCHERS = re.compile(r"(^|\s)(l2e-pretrain|torchrun|deepspeed|sbatch|srun|mpirun)\s")


def parameters(size: str) -> int:
    return load_config([str(ROOT / "configs" / f"pythia-{size}.yaml")]).model.num_parameters(50304)


def interpolated_level(size: str) -> tuple[float, float]:
    x = min(max(math.log(parameters(size)), math.log(parameters("70m"))), math.log(parameters("2.8b")))
    anchors = ("70m", "410m") if x <= math.log(parameters("410m")) else ("410m", "2.8b")
    (lo, hi), ratios = anchors, {"70m": 0.01, "410m": 0.02, "2.8b": 0.03}
    t = (x - math.log(parameters(lo))) / (math.log(parameters(hi)) - math.log(parameters(lo)))
    ratio = ratios[lo] + t * (ratios[hi] - ratios[lo])
    t_lambda = (x - math.log(parameters("70m"))) / (math.log(parameters("2.8b")) - math.log(parameters("70m")))
    return ratio, 10 ** (-9 - 2 * t_lambda)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", ["", "-deduped"])
def test_each_size_keeps_its_level_under_the_l2e_overlay(size, variant):
    if variant and size in POLYPYTHIA_ONLY:
        return
    path = str(ROOT / "configs" / f"pythia-{size}{variant}.yaml")
    plain = load_config([path]).l2e
    with_l2e = load_config([path, str(ROOT / "configs" / "l2e" / "l2e.yaml")]).l2e
    assert (plain.method, with_l2e.method) == ("none", "l2e")
    assert (with_l2e.inhibit_ratio, with_l2e.reg_lambda) == (plain.inhibit_ratio, plain.reg_lambda)
    ratio, reg_lambda = interpolated_level(size)
    assert with_l2e.inhibit_ratio == pytest.approx(ratio, abs=6e-4)  # the config rounds to 2 significant digits
    assert with_l2e.reg_lambda == pytest.approx(reg_lambda, rel=0.05)
    if size in PAPER:
        paper_ratio, paper_lambda = PAPER[size]
        assert with_l2e.inhibit_ratio == paper_ratio
        assert paper_lambda is None or with_l2e.reg_lambda == paper_lambda


def test_the_overlay_sets_no_level():
    overlay = yaml.safe_load((ROOT / "configs" / "l2e" / "l2e.yaml").read_text())["l2e"]
    assert overlay["method"] == "l2e" and not {"inhibit_ratio", "reg_lambda"} & set(overlay)


DOCUMENTS = ("README.md", "docs/pythia.md")


def documented_command_lines() -> list[list[str]]:
    """Every command line in the code blocks of README.md and docs/pythia.md that launches pretraining with
    --config files (continuation lines joined, comments dropped; `--config ...` placeholders skipped)."""
    commands = []
    text = "\n".join((ROOT / document).read_text() for document in DOCUMENTS)
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if "--config" not in line or not LAUNCHERS.search(line):
                continue
            words = shlex.split(line, comments=True)
            if "..." not in words:
                commands.append(words)
    return commands


def config_arguments(words: list[str]) -> tuple[list[str], list[str]]:
    configs, overrides = [], []
    for flag, value in zip(words, words[1:]):
        if flag == "--config":
            configs.append(value)
        elif flag == "--set":
            overrides.append(value)
    return configs, overrides


def expected_l2e(configs: list[str], overrides: list[str]) -> dict:
    """The model config's own level (the first file), the overlay's method, then any --set l2e.*."""
    own = load_config([str(ROOT / configs[0])]).l2e
    expected = {"inhibit_ratio": own.inhibit_ratio, "reg_lambda": own.reg_lambda, "method": own.method}
    for overlay in configs[1:]:
        section = (yaml.safe_load((ROOT / overlay).read_text()) or {}).get("l2e") or {}
        expected["method"] = section.get("method", expected["method"])
    for override in overrides:
        key, _, value = override.partition("=")
        if key.startswith("l2e.") and key[4:] in expected:
            expected[key[4:]] = yaml.safe_load(value)
    return expected


def test_documented_command_lines_get_their_sizes_level():
    commands = documented_command_lines()
    pythia_with_l2e = 0
    for words in commands:
        configs, overrides = config_arguments(words)
        cfg = load_config([str(ROOT / c) for c in configs], overrides)
        effective = {k: getattr(cfg.l2e, k) for k in ("inhibit_ratio", "reg_lambda", "method")}
        assert effective == expected_l2e(configs, overrides), " ".join(words)
        size = re.fullmatch(r"configs/pythia-([0-9.]+[mb])(-deduped)?\.yaml", configs[0])
        if size and cfg.l2e.method == "l2e":
            pythia_with_l2e += 1
            assert cfg.l2e.inhibit_ratio == pytest.approx(interpolated_level(size.group(1))[0], abs=6e-4)
    assert len(commands) >= 3 and pythia_with_l2e >= 1, commands  # the README's examples were found


@pytest.mark.slow
def test_print_config_shows_the_effective_l2e_section_of_every_documented_command():
    for words in documented_command_lines():
        configs, overrides = config_arguments(words)
        args = [a for c in configs for a in ("--config", c)] + [a for o in overrides for a in ("--set", o)]
        proc = subprocess.run([sys.executable, "-m", "launcher.pretrain", *args, "--print-config"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        printed = yaml.safe_load(proc.stdout)
        resolved = config_to_dict(load_config([str(ROOT / c) for c in configs], overrides))
        assert printed["l2e"] == resolved["l2e"], " ".join(words)
        assert printed == yaml.safe_load(yaml.safe_dump(resolved)), " ".join(words)
