"""Decode several directions of a multilingual model in one process, loading it once.

``fairseq-generate`` decodes one direction per process: loading fairseq, the plugin
and the checkpoint costs seconds each time, which dominates short GPU comparisons
(8 directions x 4 methods). :func:`decode_directions` parses the same command line
fairseq-generate would get for each direction (``evaluate.generate_command``), loads
the model once with the first direction's task, then for every direction sets up that
direction's task and generator and runs fairseq's own loop (``task.inference_step``,
``utils.post_process_prediction``), re-seeding as a fresh fairseq-generate process
does. The hypotheses are the ``H-`` strings fairseq-generate would print, in test-line
order.
"""

from __future__ import annotations

import ast
import time
from typing import Dict, List, Sequence


def _parse(argv: Sequence[str]):
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_generation_parser()
    args = options.parse_args_and_arch(parser, input_args=list(argv))
    return convert_namespace_to_omegaconf(args)


def decode_directions(argv_of: Dict[str, List[str]]) -> Dict[str, dict]:
    """``argv_of``: direction -> fairseq-generate arguments (without the program),
    all for the same checkpoint and settings but the direction. Returns, per direction,
    ``{"pieces": [H-line strings by test id], "tokens": generated tokens,
    "seconds": generation time}``."""
    import numpy as np
    import torch
    from fairseq import checkpoint_utils, tasks, utils
    from fairseq_cli.generate import get_symbols_to_strip_from_output

    directions = list(argv_of)
    if not directions:
        return {}
    cfg = _parse(argv_of[directions[0]])
    utils.import_user_module(cfg.common)
    use_cuda = torch.cuda.is_available() and not cfg.common.cpu
    task = tasks.setup_task(cfg.task)
    overrides = ast.literal_eval(cfg.common_eval.model_overrides)
    models, saved_cfg = checkpoint_utils.load_model_ensemble(
        utils.split_paths(cfg.common_eval.path), arg_overrides=overrides, task=task,
        suffix=cfg.checkpoint.checkpoint_suffix)
    for model in models:
        if cfg.common.fp16:
            model.half()
        if use_cuda:
            model.cuda()
        model.prepare_for_inference_(cfg)

    out = {}
    for direction in directions:
        cfg = _parse(argv_of[direction])
        if cfg.common.seed is not None and not cfg.generation.no_seed_provided:
            np.random.seed(cfg.common.seed)  # as a fresh fairseq-generate process
            utils.set_torch_seed(cfg.common.seed)
        task = tasks.setup_task(cfg.task)
        task.load_dataset(cfg.dataset.gen_subset, task_cfg=saved_cfg.task)
        tgt_dict = task.target_dictionary
        itr = task.get_batch_iterator(
            dataset=task.dataset(cfg.dataset.gen_subset),
            max_tokens=cfg.dataset.max_tokens, max_sentences=cfg.dataset.batch_size,
            max_positions=utils.resolve_max_positions(
                task.max_positions(), *[m.max_positions() for m in models]),
            ignore_invalid_inputs=cfg.dataset.skip_invalid_size_inputs_valid_test,
            required_batch_size_multiple=cfg.dataset.required_batch_size_multiple,
            seed=cfg.common.seed, num_shards=1, shard_id=0,
            num_workers=cfg.dataset.num_workers, data_buffer_size=cfg.dataset.data_buffer_size,
        ).next_epoch_itr(shuffle=False)
        generator = task.build_generator(
            models, cfg.generation,
            extra_gen_cls_kwargs={"lm_model": None, "lm_weight": cfg.generation.lm_weight})
        strip = get_symbols_to_strip_from_output(generator)
        pieces: Dict[int, str] = {}
        tokens = 0
        t0 = time.perf_counter()
        for sample in itr:
            sample = utils.move_to_cuda(sample) if use_cuda else sample
            if "net_input" not in sample:
                continue
            hypos = task.inference_step(generator, models, sample)
            for i, sample_id in enumerate(sample["id"].tolist()):
                best = hypos[i][0]
                tokens += len(best["tokens"])
                _, text, _ = utils.post_process_prediction(
                    hypo_tokens=best["tokens"].int().cpu(), src_str="",
                    alignment=best["alignment"], align_dict=None, tgt_dict=tgt_dict,
                    remove_bpe=cfg.common_eval.post_process, extra_symbols_to_ignore=strip)
                pieces[sample_id] = text
        if use_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out[direction] = {"pieces": [pieces[i] for i in sorted(pieces)], "tokens": tokens,
                          "seconds": seconds, "ids": sorted(pieces)}
    return out
