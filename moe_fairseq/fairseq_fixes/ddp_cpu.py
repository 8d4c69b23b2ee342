"""Let fairseq's ``--ddp-backend c10d`` (torch DDP) run on CPU processes.

fairseq always hands torch's DistributedDataParallel ``device_ids=[device_id]``,
which torch refuses for a module on the CPU ("device_ids ... only work with
... GPU modules"); on CPU those arguments must be left out. This is how CI and
CPU users test multi-process training (gloo) with the c10d backend.
"""



def install() -> None:
    """Idempotent; called when ``moe_fairseq`` is imported."""
    from fairseq.models import distributed_fairseq_model as dfm

    if getattr(dfm.DistributedDataParallel, "_moe_fairseq_cpu_ok", False):
        return
    torch_ddp = dfm.DistributedDataParallel

    def distributed_data_parallel(module, *args, **kwargs):
        if all(p.device.type == "cpu" for p in module.parameters()):
            kwargs.pop("device_ids", None)
            kwargs.pop("output_device", None)
        return torch_ddp(module, *args, **kwargs)

    distributed_data_parallel._moe_fairseq_cpu_ok = True
    dfm.DistributedDataParallel = distributed_data_parallel
