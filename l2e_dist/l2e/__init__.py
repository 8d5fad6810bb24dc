"""L2E / MEmeL monosemantic-neuron inhibition: config, engine, and model hooks."""

from l2e_dist.l2e.config import L2EConfig
from l2e_dist.l2e.hooks import attach
from l2e_dist.l2e.inhibitor import L2EInhibitor

__all__ = ["L2EConfig", "L2EInhibitor", "attach"]
