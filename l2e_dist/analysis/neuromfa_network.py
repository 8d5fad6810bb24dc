"""Sampled neuron interaction network of a GPTNeoX model (NeuroMFA, Xiao et al. 2025), and checkpoint loading.

Neurons are nodes and weights are edges with distance 1/|w|. Each block contributes, in the order of the
authors' released code (blocks are chained; the parallel-residual branches are not modelled separately):

    block input (h) --query_key_value--> Q, K, V outputs (3 x h) --fixed links--> attention output (h)
    attention output --attention.dense--> dense output (h) --dense_h_to_4h--> MLP (4h)
    MLP --dense_4h_to_h--> next block input (h; after the last block: the model output layer)

The fixed links carry weight 1: every sampled Q and K output to every sampled attention output, and each V
output to the attention output of the same hidden index. Q, K and V of a block share one set of hidden indices
(also used for the attention output). HF GPTNeoX interleaves query_key_value rows per head
(head0: q, k, v; head1: q, k, v; ...), which `qkv_rows` accounts for. Biases and norms are ignored.

Sampling (`sample_neuron_indices`) depends only on the model shape and the seed, never on the weights, so
every checkpoint of a run (and every run of the same shape) is analysed on the same neurons.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from l2e_dist.errors import UserError

# Source rows per Dijkstra call: bounds the dense (rows x nodes) distance block for big models.
_DIJKSTRA_ROWS = 512

_WEIGHT_NAMES = (
    "attention.query_key_value.weight",
    "attention.dense.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
)
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.\d+\.(?:" + "|".join(re.escape(n) for n in _WEIGHT_NAMES) + r")$")


class NeuroMFAError(UserError, ValueError):
    """A user-facing problem with NeuroMFA inputs (checkpoint path, state dict, sample sizes)."""


def is_block_weight(key: str) -> bool:
    """True for the four per-block weight matrices NeuroMFA reads (used to load only those)."""
    return _LAYER_KEY.search(key) is not None


def _config_value(config: Any, key: str) -> Any:
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    if value is None:
        raise NeuroMFAError(f"model config has no '{key}'; pass the HF GPTNeoX config (config.json)")
    return value


@dataclass(frozen=True)
class NetworkShape:
    """The GPTNeoX dimensions the network needs."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int

    @classmethod
    def from_config(cls, config: Any) -> NetworkShape:
        """From an HF GPTNeoXConfig or its config.json dict."""
        shape = cls(
            num_layers=int(_config_value(config, "num_hidden_layers")),
            hidden_size=int(_config_value(config, "hidden_size")),
            num_heads=int(_config_value(config, "num_attention_heads")),
            intermediate_size=int(_config_value(config, "intermediate_size")),
        )
        if shape.hidden_size % shape.num_heads:
            raise NeuroMFAError(
                f"hidden_size {shape.hidden_size} is not divisible by num_attention_heads {shape.num_heads}"
            )
        return shape

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True, eq=False)
class NeuronSample:
    """Neuron indices of one network sample (kept fixed for every checkpoint of a run)."""

    block_inputs: np.ndarray  # (L+1, k_h) hidden indices; row L is the output of the last block
    attention: np.ndarray  # (L, k_h) hidden indices shared by Q, K, V and the attention output
    dense_out: np.ndarray  # (L, k_h) hidden indices of attention.dense outputs (= MLP inputs)
    mlp: np.ndarray  # (L, k_4h) indices into the intermediate layer

    def to_json(self) -> dict[str, list[list[int]]]:
        return {name: getattr(self, name).tolist() for name in _SAMPLE_FIELDS}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NeuronSample:
        return cls(**{name: np.asarray(data[name], dtype=np.int64) for name in _SAMPLE_FIELDS})


_SAMPLE_FIELDS = ("block_inputs", "attention", "dense_out", "mlp")


def sample_neuron_indices(
    config: Any,
    num_samples: int = 10,
    seed: int = 0,
    hidden_per_layer: int = 32,
    intermediate_per_layer: int = 64,
) -> list[NeuronSample]:
    """`num_samples` independent samples; sample s depends only on (shape, seed, s), not on the weights."""
    shape = NetworkShape.from_config(config)
    if not 0 < hidden_per_layer <= shape.hidden_size:
        raise NeuroMFAError(
            f"hidden_per_layer={hidden_per_layer} must be in 1..hidden_size ({shape.hidden_size})"
        )
    if not 0 < intermediate_per_layer <= shape.intermediate_size:
        raise NeuroMFAError(
            f"intermediate_per_layer={intermediate_per_layer} must be in 1..intermediate_size "
            f"({shape.intermediate_size})"
        )
    if num_samples < 1:
        raise NeuroMFAError(f"num_samples={num_samples} must be at least 1")

    def draw(rng: np.random.Generator, rows: int, population: int, size: int) -> np.ndarray:
        # Independent draws without replacement per row, sorted for readable JSON.
        return np.sort(np.argsort(rng.random((rows, population)), axis=1)[:, :size], axis=1)

    samples = []
    for index in range(num_samples):
        rng = np.random.default_rng([seed, index])
        layers, hidden = shape.num_layers, shape.hidden_size
        samples.append(
            NeuronSample(
                block_inputs=draw(rng, layers + 1, hidden, hidden_per_layer),
                attention=draw(rng, layers, hidden, hidden_per_layer),
                dense_out=draw(rng, layers, hidden, hidden_per_layer),
                mlp=draw(rng, layers, shape.intermediate_size, intermediate_per_layer),
            )
        )
    return samples


def qkv_rows(hidden_index: np.ndarray, head_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of HF query_key_value.weight ([3h, h], interleaved per head) for Q, K, V of hidden indices."""
    head, within = np.divmod(np.asarray(hidden_index, dtype=np.int64), head_size)
    q = head * 3 * head_size + within
    return q, q + head_size, q + 2 * head_size


def _layer_prefix(state_dict: Mapping[str, Any], num_layers: int) -> str:
    """'gpt_neox.layers' (GPTNeoXForCausalLM) or 'layers' (GPTNeoXModel), with every needed weight present."""
    prefix = "gpt_neox.layers" if f"gpt_neox.layers.0.{_WEIGHT_NAMES[0]}" in state_dict else "layers"
    for b in range(num_layers):
        for name in _WEIGHT_NAMES:
            if f"{prefix}.{b}.{name}" not in state_dict:
                raise NeuroMFAError(
                    f"state dict has no 'gpt_neox.layers.{b}.{name}' for the config's {num_layers} layers: "
                    "pass the HF GPTNeoX state dict that matches the config"
                )
    return prefix


def _submatrix(weight: Any, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """weight[rows][:, cols] as float64 numpy, slicing before any dtype/device copy of the full matrix."""
    if hasattr(weight, "detach"):  # torch tensor, any dtype/device: index first, convert the small block
        import torch

        block = weight.detach()[torch.as_tensor(rows)][:, torch.as_tensor(cols)]
        return block.to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(weight)[np.ix_(rows, cols)].astype(np.float64)


@dataclass(frozen=True)
class SampledNetwork:
    """Directed weighted edge list of one sample; `layers` maps a layer name to its node ids."""

    num_nodes: int
    source: np.ndarray
    target: np.ndarray
    weight: np.ndarray
    layers: dict[str, np.ndarray]


def build_network(state_dict: Mapping[str, Any], config: Any, sample: NeuronSample) -> SampledNetwork:
    """Edges between the sampled neurons: weight blocks via fancy indexing, fixed attention links."""
    shape = NetworkShape.from_config(config)
    prefix = _layer_prefix(state_dict, shape.num_layers)
    if sample.attention.shape[0] != shape.num_layers:
        raise NeuroMFAError(
            f"sample indices are for {sample.attention.shape[0]} layers but the model has {shape.num_layers}"
        )
    layers: dict[str, np.ndarray] = {}
    next_node = 0

    def add_layer(name: str, size: int) -> np.ndarray:
        nonlocal next_node
        layers[name] = np.arange(next_node, next_node + size)
        next_node += size
        return layers[name]

    sources, targets, weights = [], [], []

    def connect(src: np.ndarray, dst: np.ndarray, block: np.ndarray) -> None:
        """block[i, j] is the weight from src[j] to dst[i] (torch Linear layout [out, in])."""
        sources.append(np.broadcast_to(src[None, :], block.shape).ravel())
        targets.append(np.broadcast_to(dst[:, None], block.shape).ravel())
        weights.append(block.ravel())

    k_h, k_4h = sample.attention.shape[1], sample.mlp.shape[1]
    block_input = add_layer("block0.input", k_h)
    for b in range(shape.num_layers):
        w_qkv, w_dense, w_up, w_down = (state_dict[f"{prefix}.{b}.{name}"] for name in _WEIGHT_NAMES)
        q_rows, k_rows, v_rows = qkv_rows(sample.attention[b], shape.head_size)
        q_nodes, k_nodes, v_nodes = (add_layer(f"block{b}.{p}", k_h) for p in ("q", "k", "v"))
        qkv = _submatrix(w_qkv, np.concatenate([q_rows, k_rows, v_rows]), sample.block_inputs[b])
        connect(block_input, np.concatenate([q_nodes, k_nodes, v_nodes]), qkv)

        attention_nodes = add_layer(f"block{b}.attention", k_h)
        connect(np.concatenate([q_nodes, k_nodes]), attention_nodes, np.ones((k_h, 2 * k_h)))
        sources.append(v_nodes)
        targets.append(attention_nodes)
        weights.append(np.ones(k_h))

        dense_nodes = add_layer(f"block{b}.dense_out", k_h)
        connect(attention_nodes, dense_nodes, _submatrix(w_dense, sample.dense_out[b], sample.attention[b]))
        mlp_nodes = add_layer(f"block{b}.mlp", k_4h)
        connect(dense_nodes, mlp_nodes, _submatrix(w_up, sample.mlp[b], sample.dense_out[b]))
        next_input = add_layer(f"block{b + 1}.input", k_h)
        connect(mlp_nodes, next_input, _submatrix(w_down, sample.block_inputs[b + 1], sample.mlp[b]))
        block_input = next_input

    weight_all = np.concatenate(weights)
    nonzero = weight_all != 0  # a zero weight is no edge (infinite distance)
    return SampledNetwork(
        num_nodes=next_node,
        source=np.concatenate(sources)[nonzero],
        target=np.concatenate(targets)[nonzero],
        weight=weight_all[nonzero],
        layers=layers,
    )


def direct_distances(network: SampledNetwork) -> tuple[np.ndarray, np.ndarray]:
    """(node, 1/|w|) for each node's outgoing edges: the authors' released-code definition (default)."""
    return network.source, 1.0 / np.abs(network.weight)


def shortest_path_distances(
    network: SampledNetwork, max_distance: float = 150.0
) -> tuple[np.ndarray, np.ndarray]:
    """(node, d) for every node reachable along directed (input -> output) paths within max_distance."""
    graph = csr_matrix(
        (1.0 / np.abs(network.weight), (network.source, network.target)),
        shape=(network.num_nodes, network.num_nodes),
    )
    nodes, distances = [], []
    for start in range(0, network.num_nodes, _DIJKSTRA_ROWS):
        rows = np.arange(start, min(start + _DIJKSTRA_ROWS, network.num_nodes))
        block = dijkstra(graph, directed=True, indices=rows, limit=max_distance)
        row, col = np.nonzero(np.isfinite(block))
        off_diagonal = rows[row] != col
        nodes.append(rows[row[off_diagonal]])
        distances.append(block[row[off_diagonal], col[off_diagonal]])
    return np.concatenate(nodes), np.concatenate(distances)


def _read_safetensors(directory: Path, key_filter: Callable[[str], bool]) -> dict[str, Any]:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({name for key, name in weight_map.items() if key_filter(key)})
    else:
        files = ["model.safetensors"]
    state: dict[str, Any] = {}
    for name in files:
        with safe_open(str(directory / name), framework="pt") as handle:
            for key in handle.keys():
                if key_filter(key):
                    state[key] = handle.get_tensor(key)
    return state


def load_gptneox_state(
    path: str | Path, key_filter: Callable[[str], bool] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HF-named state dict, HF config) of a checkpoint without instantiating the model.

    HF directories (config.json + model.safetensors, a sharded safetensors index, or pytorch_model.bin) are
    read here; any other path goes through `l2e_dist.checkpoint.convert.load_as_hf_state_dict` (our training
    checkpoints at any TP). `key_filter` selects the tensors to load (e.g. `is_block_weight`) for HF dirs.
    """
    path = Path(path)
    keep = key_filter or (lambda _key: True)
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
            return _read_safetensors(path, keep), config
        if (path / "pytorch_model.bin").is_file():
            import torch

            full = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
            return {k: v for k, v in full.items() if keep(k)}, config
    try:
        from l2e_dist.checkpoint.convert import load_as_hf_state_dict
    except ImportError as exc:
        raise NeuroMFAError(
            f"cannot load checkpoint '{path}': not an HF directory (config.json + model.safetensors) and the "
            f"training-checkpoint converter is unavailable ({exc})"
        ) from exc
    try:
        state, config = load_as_hf_state_dict(path)
    except Exception as exc:  # the converter's own message is kept in the chain
        raise NeuroMFAError(
            f"cannot load checkpoint '{path}': not an HF directory and not a readable training checkpoint ({exc})"
        ) from exc
    return {k: v for k, v in state.items() if keep(k)}, config
