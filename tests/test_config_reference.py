"""docs/configuration.md is generated from the config dataclasses and stays in sync; `--section.key=value` is
`--set section.key=value`; every command's --help shows examples."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

import pytest

import launcher
from l2e_dist.checkpoint.identity import config_keys
from l2e_dist.config import TrainConfig
from l2e_dist.config_reference import COMMAND, field_comments, render, section_table
from tests.conftest import ROOT


def test_docs_configuration_md_is_generated_from_the_source():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == render(), f"docs/configuration.md is out of date: run `{COMMAND}`"


def test_every_key_is_listed_with_a_description():
    page = render()
    for key in config_keys():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} is missing from the reference"
        description = row.rsplit(" | ", 1)[-1].rstrip(" |")
        assert description, f"{key} has no comment in the source: add one beside or above its field"


@dataclass
class _Planted:
    # Two lines above,
    # joined.
    above: int = 1
    inline: str = "x"  # beside it
    bare: float = 0.5
    spread: list[int] = field(  # on the first line
        default_factory=lambda: [1, 2]  # and the second
    )


def test_comments_above_beside_and_inside_a_field_are_read():
    assert field_comments(_Planted) == {"above": "Two lines above, joined.", "inline": "beside it", "bare": "",
                                        "spread": "on the first line and the second"}


def test_a_table_row_shows_type_default_and_whether_a_resume_must_keep_it():
    rows = "\n".join(section_table("train", TrainConfig))
    assert "| `train.seed` | int | `1234` | **must match** | initialization and data order |" in rows
    assert "| `train.micro_batch_size` | int | `1` | free |" in rows
    assert "| `train.save_schedule` | interval \\| pythia | `interval` | free |" in rows
    assert "| `train.output_dir` | str or null | `null` | free |" in rows


@pytest.mark.parametrize(("given", "expected"), [
    (["--train.seed=7"], ["--set", "train.seed=7"]),
    (["--optimizer.lr", "3e-4", "--dry-run"], ["--set", "optimizer.lr=3e-4", "--dry-run"]),
    (["--config", "a.yaml", "--data.paths=[a, b]"], ["--config", "a.yaml", "--set", "data.paths=[a, b]"]),
    (["--l2e.method", "--dry-run"], ["--set", "l2e.method", "--dry-run"]),  # no value: named by the config
    (["--config=x.yaml", "--", "--train.seed=1"], ["--config=x.yaml", "--", "--train.seed=1"]),
])
def test_dotted_flags_become_set_overrides(given, expected):
    assert launcher.dotted_overrides(given) == expected


def test_pretrain_takes_dotted_flags_like_set(capsys):
    from launcher.pretrain import main, parse_args

    tiny = str(ROOT / "configs" / "tiny.yaml")
    args = parse_args(["--config", tiny, "--train.seed=7", "--set", "optimizer.lr=1e-4", "--l2e.method", "none"])
    assert args.set == ["train.seed=7", "optimizer.lr=1e-4", "l2e.method=none"]
    assert main(["--config", tiny, "--train.sed=7", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        "l2e-pretrain: error: config error at 'train.sed': unknown key (did you mean 'seed'?)")
    assert main(["--config", tiny, "--train.seed", "--dry-run"]) == 2
    assert "override must look like key.sub=value" in capsys.readouterr().err


ENTRY_POINTS = sorted(m.name for m in pkgutil.iter_modules(launcher.__path__))


def test_every_entry_point_is_checked():
    assert {"pretrain", "convert", "eval", "prepare_data", "bench"} <= set(ENTRY_POINTS)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_shows_examples(name, capsys):
    module = importlib.import_module(f"launcher.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    prog = out.split()[1]  # "usage: l2e-xyz ..."
    examples = [line for line in out.splitlines() if line.lstrip().startswith(prog + " ")]
    assert examples, f"`{prog} --help` shows no example command:\n{out}"
