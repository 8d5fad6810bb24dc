"""Checkpoint I/O split over the ranks: which rank writes and reads which file of a checkpoint (every file is
checked by at least one rank in any layout), and a real 2-rank selection in which each rank deep-verifies only
the files it will read, and a file damaged on one rank's share makes both ranks fall back together."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from l2e_dist.checkpoint.rank_files import RankPosition, files_of_rank
from tests.checkpoint_runs import reference_run
from tests.distributed import run_distributed

ZERO1_TP2_DP2 = [
    "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt",
    *(f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for d in (0, 1) for t in (0, 1)),
    *(f"rank_state_{r}.pt" for r in range(4)), "extra/notes.json",
]


def _positions(tp: int, dp: int) -> list[RankPosition]:
    # megatron-core's order: TP ranks are adjacent
    return [RankPosition(r, tp * dp, r % tp, tp, r // tp, dp) for r in range(tp * dp)]


def test_writers_and_readers_of_a_tp2_dp2_checkpoint():
    ranks = _positions(tp=2, dp=2)
    written = [files_of_rank(ZERO1_TP2_DP2, me, reading=False) for me in ranks]
    read = [files_of_rank(ZERO1_TP2_DP2, me, reading=True) for me in ranks]
    assert written[0] == ["mp_rank_00_model_states.pt", "rank_state_0.pt",
                          "zero_pp_rank_0_mp_rank_00_optim_states.pt", "extra/notes.json"]
    assert written[3] == ["rank_state_3.pt", "zero_pp_rank_1_mp_rank_01_optim_states.pt"]
    assert sorted(sum(written, [])) == sorted(ZERO1_TP2_DP2)  # each file written by exactly one rank
    # every DP rank reads its TP rank's model states, and only its own optimizer shard and RNG state
    assert read[2] == ["mp_rank_00_model_states.pt", "rank_state_2.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert set(sum(read, [])) == set(ZERO1_TP2_DP2)


@pytest.mark.parametrize(("tp", "dp"), [(1, 2), (1, 1), (2, 4)])
def test_another_layout_still_checks_every_file(tp, dp):
    checked = [files_of_rank(ZERO1_TP2_DP2, me, reading=True) for me in _positions(tp, dp)]
    assert set(sum(checked, [])) == set(ZERO1_TP2_DP2)


def _select_and_log(ckpt_dir: str) -> tuple[str | None, list[str]]:
    """On each rank: the collective selection, logging the files this rank deep-verified."""
    import l2e_dist.checkpoint.manifest as io
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(1)
    checked: list[str] = []
    original = io.verify_file

    def logged(ckpt, rel, size, digest, deep):
        if deep:
            checked.append(f"{Path(ckpt).name}/{rel}")
        return original(ckpt, rel, size, digest, deep)

    io.verify_file = logged
    try:
        chosen = io.select_resume_checkpoint(Path(ckpt_dir))
    finally:
        destroy_process_groups()
    return (chosen.name if chosen else None), checked


@pytest.mark.slow
def test_each_rank_verifies_its_own_files_and_both_fall_back_together(tmp_path, tmp_path_factory, data_cache):
    source = reference_run("dp2_zero3", tmp_path_factory.getbasetemp(), data_cache) / "checkpoints"
    for tag in ("global_step7", "global_step8"):
        shutil.copytree(source / tag, tmp_path / tag)
    (tmp_path / "latest").write_text("global_step8")
    (chosen0, checked0), (chosen1, checked1) = run_distributed(_select_and_log, 2, str(tmp_path))
    assert chosen0 == chosen1 == "global_step8"
    assert "global_step8/zero_pp_rank_1_mp_rank_00_optim_states.pt" in checked1
    assert not any("zero_pp_rank_1" in f or "rank_state_1" in f for f in checked0), checked0
    assert not any("zero_pp_rank_0" in f or "rank_state_0" in f for f in checked1), checked1
    # flip a byte in a file only rank 1 reads: rank 1 finds it, both move to global_step7
    shard = tmp_path / "global_step8" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (chosen0, _), (chosen1, _) = run_distributed(_select_and_log, 2, str(tmp_path))
    assert chosen0 == chosen1 == "global_step7"
