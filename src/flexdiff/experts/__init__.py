"""Mixture of efficient experts (DiffPruning): intervals, elastic experts, routing agent, mixture."""
