"""Checkpoint conversions: dense -> MoE (sparse upcycling) and MoE -> smaller MoE
(expert pruning for deployment)."""
