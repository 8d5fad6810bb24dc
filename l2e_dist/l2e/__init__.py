"""L2E / MEmeL monosemantic-neuron inhibition: config, engine, and model hooks. Read reference.py first: one
layer's pass, top to bottom; inhibitor.py drives it step by step."""

from l2e_dist.l2e.config import L2EConfig
from l2e_dist.l2e.hooks import attach
from l2e_dist.l2e.inhibitor import L2EInhibitor, MicroBatch

__all__ = ["L2EConfig", "L2EInhibitor", "MicroBatch", "attach"]
