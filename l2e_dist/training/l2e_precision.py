"""`l2e.grad_precision: fp32`: the L2E regularizer's gradient reaches the fp32 gradients whole in a bf16 run.

In one backward of `lm_loss + l2e_loss` the regularizer's gradient is added to the bf16 activation gradient and,
through every bf16 weight-gradient GEMM below, to the LM's: a part under half a unit in the last place of the LM
gradient is rounded off (benchmarks/l2e_bf16_survival.py measures how much). DeepSpeed's bf16 optimizer (ZeRO 0/1:
BF16_Optimizer, `grad_accum_dtype: fp32`) keeps fp32 gradient buffers. Here the regularizer gets its own backward
through the engine, before the LM's: its bf16 weight gradients are exact to bf16's precision of the regularizer's
own size, and with `bf16.immediate_grad_update` each parameter's gradient moves into its fp32 buffer as soon as it
is ready, so the two backwards' gradients meet only in fp32. The step's reduction then has to send fp32
(`communication_data_type: fp32`, doubling the gradient all-reduce's bytes): DeepSpeed's default, the model's
dtype, rounds the summed gradients to bf16 there, and the regularizer's part with them (training/optim.py sets
both; tests/test_l2e_grad_precision.py).

The first backward keeps the graph (retain_graph) and runs under `engine.no_sync()`, so that the step's
data-parallel reduction happens once, after the LM backward, over the sum. ZeRO-2 is refused (config.py): it
reduces each backward into its gradient partitions and keeps the last. The cost is one more backward from the
deepest inhibited layer down, per micro-batch with a selection, and fp32 gradient communication.
"""

from __future__ import annotations

import torch


def backward_micro_batch(engine, lm_loss: torch.Tensor, l2e_loss: torch.Tensor | float, separate: bool) -> None:
    """Backward of this micro-batch's loss: today's single backward of lm_loss + l2e_loss, or with `separate`
    the regularizer's own backward first, so that its gradient reaches DeepSpeed's fp32 accumulation whole.
    `l2e_loss` is 0.0 without an inhibitor (L2EMicroBatch.loss)."""
    if not isinstance(l2e_loss, torch.Tensor):
        engine.backward(lm_loss + l2e_loss if l2e_loss else lm_loss)
    elif not separate or not l2e_loss.requires_grad:  # nothing selected: no regularizer gradient to keep apart
        engine.backward(lm_loss + l2e_loss)
    else:
        with engine.no_sync():  # the step's reduction once, in the LM backward
            engine.backward(l2e_loss, retain_graph=True)
        engine.backward(lm_loss)
