"""Checkpoint conversions: dense -> MoE (sparse upcycling), MoE -> smaller MoE (expert
pruning for deployment), several checkpoints -> their weight average."""
