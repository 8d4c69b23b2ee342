"""The MoE layer and its parts: ``moe_layer`` (the layer: router -> dispatcher ->
expert bank -> combine, and its statistics), ``dispatcher`` (sort-based dispatch and
gated combine), ``expert_bank`` (E FFNs as grouped GEMMs), ``requested_capacity``
(SMoE's capacity statistics) and ``similarity_loss`` (the expert-specialization loss).
The routers live in ``moe_fairseq.routers``, expert parallelism in
``moe_fairseq.parallel``."""
