"""Time NeuroMFA on one checkpoint of pythia-70m shape (6 layers, hidden 512, 8 heads, 4h 2048, vocab 50304).

    python benchmarks/bench_neuromfa.py                     # random-init pythia-70m-shaped HF dir in a tmp dir
    python benchmarks/bench_neuromfa.py --model-dir DIR     # any HF GPTNeoX directory (e.g. a Pythia revision)

Reports the load time (safetensors, block weights only) and the analysis time (best wall and CPU time of
--repeats runs; CPU time is the steadier figure on a shared machine) of all samples for direct-edge and
shortest-path distances; the default is the paper's 10 samples of 32 / 64 neurons per layer.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from l2e_dist.analysis.neuromfa import NeuroMFASettings, analyse_state_dict
from l2e_dist.analysis.neuromfa_network import is_block_weight, load_gptneox_state

PYTHIA_70M = {
    "vocab_size": 50304,
    "hidden_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "intermediate_size": 2048,
    "max_position_embeddings": 2048,
    "rotary_pct": 0.25,
}


def save_random_pythia_70m(directory: Path) -> None:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_70M)).save_pretrained(directory)


def time_checkpoint(directory: Path, samples: int, repeats: int) -> None:
    started = time.perf_counter()
    state, config = load_gptneox_state(directory, key_filter=is_block_weight)
    print(f"load (block weights, safetensors): {time.perf_counter() - started:.2f} s")
    for distance in ("direct", "shortest"):
        settings = NeuroMFASettings(distance=distance, num_samples=samples)
        neuron_samples = settings.samples(config)
        best_wall = best_cpu = float("inf")
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            result = analyse_state_dict(state, config, neuron_samples, settings)
            best_wall = min(best_wall, time.perf_counter() - wall)
            best_cpu = min(best_cpu, time.process_time() - cpu)
        nodes = [s.num_nodes for s in result.spectra if s is not None]
        print(
            f"{distance:8s}: {best_wall:.2f} s wall, {best_cpu:.2f} s CPU for {samples} samples "
            f"({best_wall / samples * 1e3:.0f} ms/sample wall, {min(nodes)}-{max(nodes)} nodes) "
            f"alpha_0={result.alpha_0:.4f} width={result.width:.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model-dir", type=Path, help="HF GPTNeoX directory (default: random pythia-70m shape)"
    )
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many analysis runs")
    args = parser.parse_args()
    if args.model_dir is not None:
        time_checkpoint(args.model_dir, args.samples, args.repeats)
        return
    with tempfile.TemporaryDirectory(prefix="bench_neuromfa_") as tmp:
        started = time.perf_counter()
        save_random_pythia_70m(Path(tmp))
        print(f"built + saved random pythia-70m-shaped checkpoint: {time.perf_counter() - started:.1f} s")
        time_checkpoint(Path(tmp), args.samples, args.repeats)


if __name__ == "__main__":
    main()
