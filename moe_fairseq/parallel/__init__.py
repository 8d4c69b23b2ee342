"""Expert parallelism: experts sharded across ranks. ``all_to_all`` (the token exchange,
NCCL or gloo, uneven splits), ``dispatcher`` (the all-to-all dispatcher the MoE layer
uses when its experts are sharded) and ``expert_parallel`` (process groups, gradient
scaling and fairseq's Trainer glue: optimizer state, checkpoints of all experts)."""
