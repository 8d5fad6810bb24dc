"""Checkpoint verification on copies of a real ZeRO-3 checkpoint pair (steps 7 and 8): a truncated or missing
shard, a corrupt `latest` pointer and a file that would run code when unpickled are each detected, the resume
falls back to the previous intact checkpoint (left untouched) with a warning, and with nothing intact it stops
with one clear error. The reader also refuses an incomplete shard set on its own (no manifest needed)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from l2e_dist.checkpoint.ds_files import CheckpointFormatError, DeepSpeedCheckpoint, safe_load
from l2e_dist.checkpoint.manifest import (
    CheckpointError,
    find_resume_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from tests.checkpoint_runs import reference_run

pytestmark = pytest.mark.slow  # every test reads a 2-rank ZeRO-3 reference run (torchrun)

SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_cache) -> Path:
    return reference_run("dp2_zero3", tmp_path_factory.getbasetemp(), data_cache) / "checkpoints"


@pytest.fixture
def ckpt_dir(source, tmp_path) -> Path:
    """global_step7 and global_step8 (latest) of the reference run."""
    for tag in ("global_step7", "global_step8"):
        shutil.copytree(source / tag, tmp_path / tag)
    (tmp_path / "latest").write_text("global_step8")
    return tmp_path


def _digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def assert_logged(capsys, text: str) -> None:
    """Checkpoint fallbacks are operational log lines on stdout (`<UTC time> l2e-dist: ...`), not warnings."""
    out = capsys.readouterr().out
    assert re.search(rf"^\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ l2e-dist: .*{re.escape(text)}", out, re.M), out


def test_intact_checkpoint_verifies_deeply(ckpt_dir):
    assert verify_checkpoint(ckpt_dir / "global_step8", deep=True) is None
    assert find_resume_checkpoint(ckpt_dir, deep=True) == ckpt_dir / "global_step8"


def test_truncated_shard_falls_back_to_the_previous_checkpoint(ckpt_dir, capsys):
    before = _digest(ckpt_dir / "global_step7")
    shard = ckpt_dir / "global_step8" / SHARD
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    assert "truncated" in verify_checkpoint(ckpt_dir / "global_step8")
    assert find_resume_checkpoint(ckpt_dir, deep=True) == ckpt_dir / "global_step7"
    assert_logged(capsys, "falling back to global_step7")
    assert _digest(ckpt_dir / "global_step7") == before


def test_flipped_byte_in_tensor_data_fails_the_checksum_and_falls_back(ckpt_dir, capsys):
    # Same size, pickle structure intact, one tensor byte changed: only the sha256 can tell.
    shard = ckpt_dir / "global_step8" / SHARD
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert verify_checkpoint(ckpt_dir / "global_step8") is None  # the cheap check (sizes) cannot see it
    assert safe_load(shard) is not None  # nor can loading it
    assert "does not match its sha256" in verify_checkpoint(ckpt_dir / "global_step8", deep=True)
    assert find_resume_checkpoint(ckpt_dir, deep=True) == ckpt_dir / "global_step7"
    assert_logged(capsys, "falling back to global_step7")


def test_missing_shard_is_detected_with_and_without_manifest(ckpt_dir, capsys):
    (ckpt_dir / "global_step8" / SHARD).unlink()
    assert "is missing" in verify_checkpoint(ckpt_dir / "global_step8")
    (ckpt_dir / "global_step8" / "manifest.json").unlink()
    with pytest.raises(CheckpointFormatError, match="missing optimizer shard tp=0 dp=1"):
        DeepSpeedCheckpoint(ckpt_dir / "global_step8")
    assert find_resume_checkpoint(ckpt_dir) == ckpt_dir / "global_step7"
    assert_logged(capsys, "falling back to global_step7")


def test_corrupt_latest_pointer_uses_the_newest_intact_checkpoint(ckpt_dir, capsys):
    (ckpt_dir / "latest").write_bytes(b"\xff\x00not a tag")
    assert find_resume_checkpoint(ckpt_dir, deep=True) == ckpt_dir / "global_step8"
    assert_logged(capsys, "latest is corrupt")
    (ckpt_dir / "latest").write_text("global_step99")  # names a checkpoint that does not exist
    assert find_resume_checkpoint(ckpt_dir, deep=True) == ckpt_dir / "global_step8"
    assert_logged(capsys, "falling back to global_step8")


def test_nothing_intact_is_one_clear_error(ckpt_dir, capsys):
    for tag in ("global_step7", "global_step8"):
        (ckpt_dir / tag / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no intact checkpoint .*train.resume=false"):
        find_resume_checkpoint(ckpt_dir)
    assert_logged(capsys, "skipping checkpoint global_step8")
    assert find_resume_checkpoint(ckpt_dir / "empty") is None  # nothing to resume: a fresh start


class _RunsCode:
    """Unpickling it calls open(marker, "w"), i.e. creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_file_that_runs_code_when_unpickled_is_refused_unrun(ckpt_dir, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    payload = _RunsCode(marker)
    step8 = ckpt_dir / "global_step8"
    state = torch.load(step8 / "rank_state_0.pt", weights_only=True)
    torch.save({**state, "extra": payload}, step8 / "rank_state_0.pt")
    write_manifest(step8)  # sizes agree: only the content check can catch it
    problem = verify_checkpoint(step8, deep=True)
    assert "cannot be loaded safely" in problem and "'io.open'" in problem
    with pytest.raises(CheckpointFormatError):
        safe_load(step8 / "rank_state_0.pt")
    assert find_resume_checkpoint(ckpt_dir, deep=True) == ckpt_dir / "global_step7"
    assert_logged(capsys, "falling back to global_step7")
    assert not marker.exists()


def test_manifest_lists_every_file_with_its_size_and_sha256(ckpt_dir):
    step8 = ckpt_dir / "global_step8"
    files = json.loads((step8 / "manifest.json").read_text())["files"]
    on_disk = {p.name: p.stat().st_size for p in step8.iterdir() if p.name != "manifest.json"}
    assert files == on_disk
    assert {"rank_state_0.pt", "rank_state_1.pt", SHARD} <= set(files)
    # the digests were computed by the two ranks in parallel at save time: they match the files' own
    digests = json.loads((step8 / "manifest.json").read_text())["sha256"]
    assert digests == {name: hashlib.sha256((step8 / name).read_bytes()).hexdigest() for name in files}


def test_resume_refuses_another_model_or_data_position(source):
    from l2e_dist.checkpoint.io import check_resumable
    from l2e_dist.config import RunConfig
    from l2e_dist.config_utils import build

    saved = DeepSpeedCheckpoint(source / "global_step8").client_state["config"]

    def config(**changes):  # the saved run's config with some keys changed
        cfg = build(RunConfig, saved)
        for dotted, value in changes.items():
            section, key = dotted.split(".")
            setattr(getattr(cfg, section), key, value)
        return cfg

    check_resumable(saved, config(**{"parallel.tensor_parallel": 2, "deepspeed.zero_stage": 1,
                                     "train.micro_batch_size": 1}))
    with pytest.raises(CheckpointError, match=r"ckpt holds another experiment \(model.hidden_size: 64 -> 128; "
                                              r"model.intermediate_size: 256 -> 512\)"):  # null = 4 x hidden
        check_resumable(saved, config(**{"model.hidden_size": 128}), "ckpt")
    with pytest.raises(CheckpointError, match=r"\(train.global_batch_size: 8 -> 16\)"):
        check_resumable(saved, config(**{"train.global_batch_size": 16}))
