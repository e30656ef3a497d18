"""Adapters for the RL frameworks users already run: ``tic_kernels.integrations.trl`` (TRL's
GRPOTrainer) and ``tic_kernels.integrations.verl`` (verl's policy-loss registry). Each imports
its framework when it is imported itself; ``import tic_kernels`` imports neither."""
