"""Emergence testbed: multitask sparse parity, a 2-layer network trained along time, data and width, the
skill-basis model of Nam et al. fitted on skill 1, and L2E/MEmeL inhibition through the pretraining engine.

Entry point: `l2e-emergence --config configs/emergence/<name>.yaml` (launcher/emergence.py -> sweep.run_sweep).
"""
