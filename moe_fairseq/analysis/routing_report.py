"""The routing report: ``report.json`` (every number), ``report.md`` (tables, a
sentence per layer on which experts took which languages, the figures embedded)
and the PNG figures of ``routing_figures.py``, for one model or several side by side.

``models`` is a list of ``(label, meta, summary)``: ``meta`` describes the checkpoint
(``path``, ``arch``, ``num_updates``), ``summary`` is :meth:`RoutingCounts.summary`.
"""

import json
import os
from typing import List, Sequence, Tuple

from ..atomic_files import write_atomically
from . import routing_figures

CAPTIONS = {
    "heatmap_target_language.png":
        "Per MoE layer (rows) and model (columns): where each target language's tokens go "
        "first. Row = target language, column = expert; a row sums to 100% (the share of the "
        "language's tokens whose first choice is the expert). A bright single cell per row "
        "means the layer routes by target language.",
    "heatmap_source_language.png":
        "The same by source language (the sentence's input language).",
    "expert_load.png":
        "Each expert's share of the token-expert assignments (all passes, before capacity "
        "dropping). Dashed: the fair share 1/E; red, hatched: starved experts (< 10% of the "
        "fair share). Colours group SMoE strata or MoEC clusters (named in the panel's legend).",
    "mutual_information.png":
        "I(expert; language) in bits between a token's first-choice expert and its "
        "sentence's target (left) or source (right) language. 0 = routing ignores the "
        "language; H(language) (dotted) = the expert tells the language.",
    "entropies.png":
        "Left: mean per-token entropy of the router's probabilities, H_s (0 = every token "
        "is sent to one expert with certainty). Right: entropy of the experts' mean usage, "
        "H_u (log2 E, dashed = all experts used equally). Bits, first routing pass.",
    "smoe_strata.png":
        "SMoE: share of a layer's tokens that reach each stratum (stratum 0: all), and the "
        "requested capacity, expert passes per token, per target language.",
    "moec_clusters.png":
        "MoEC: each cluster's share of the assignments and the coefficient of variation of "
        "the load among the experts of a cluster.",
}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def language_sentence(layer: dict, side: str = "target") -> str:
    """``de -> e3 (62%), en -> e5 (40%)``: each language's most chosen expert and the
    share of the language's tokens it takes."""
    d = layer[f"{side}_language"]
    parts = []
    for i, lang in enumerate(d["languages"]):
        if lang not in d["top_expert"]:
            continue
        e = d["top_expert"][lang]
        parts.append(f"{lang} → e{e} ({_pct(d['share'][i][e])})")
    return ", ".join(parts)


def markdown(models: Sequence[Tuple[str, dict, dict]], split: str, figures: List[str]) -> str:
    lines = ["# Routing report", "",
             f"Split `{split}`, routed teacher-forced in eval mode (inference routing). "
             "Written by `scripts/routing_report.py`; every number is in `report.json`.", "",
             "## Models", "",
             "| model | checkpoint | arch | router | MoE layers | experts | updates | "
             "directions | tokens per layer |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for label, meta, s in models:
        first = s["layers"][0]
        lines.append(
            f"| {label} | `{meta['path']}` | {meta['arch']} | {first['router']} | "
            f"{len(s['layers'])} | {first['num_experts']} | {meta.get('num_updates', '-')} | "
            f"{', '.join(s['directions'])} | {sum(s['direction_tokens'].values())} |")
    lines += ["", "## Per MoE layer", "",
              "I(E; lang): mutual information between first-choice expert and language, bits "
              "(in brackets: its share of H(language), 1 = the expert tells the language). "
              "H_s: per-token gate entropy; H_u: expert-usage entropy (max log2 E); bits.", "",
              "| model | layer | load CV | starved experts | I(E; tgt lang) | I(E; src lang) | "
              "H_s | H_u (max) |",
              "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for label, _, s in models:
        for l in s["layers"]:
            t, src = l["target_language"], l["source_language"]
            lines.append(
                f"| {label} | {l['name']} | {l['load_cv']:.3f} | "
                f"{', '.join(map(str, l['starved'])) or 'none'} | "
                f"{t['mi_bits']:.3f} ({t['mi_share']:.2f}) | {src['mi_bits']:.3f} "
                f"({src['mi_share']:.2f}) | {_fmt(l['gate_entropy_bits'])} | "
                f"{_fmt(l['usage_entropy_bits'])} ({l['max_entropy_bits']:.2f}) |")
    lines += ["", "## Which experts took which languages", "",
              "Per layer, each target language's most chosen expert (first choice) and the "
              "share of that language's tokens it takes.", ""]
    for label, _, s in models:
        lines.append(f"**{label}**")
        lines.append("")
        for l in s["layers"]:
            lines.append(f"- `{l['name']}`: {language_sentence(l)}")
        lines.append("")
    smoe = [(label, l) for label, _, s in models for l in s["layers"] if l.get("strata")]
    if smoe:
        langs = sorted({k for _, l in smoe for k in l["strata"]["requested_capacity_by_target_language"]})
        lines += ["## SMoE strata and requested capacity", "",
                  "| model | layer | strata | tokens reaching each stratum | requested capacity | "
                  + " | ".join(f"→{lang}" for lang in langs) + " |",
                  "| --- | --- | --- | --- | ---: | " + " | ".join("---:" for _ in langs) + " |"]
        for label, l in smoe:
            st = l["strata"]
            by = st["requested_capacity_by_target_language"]
            lines.append(
                f"| {label} | {l['name']} | {','.join(map(str, st['sizes']))} | "
                f"{' / '.join(_pct(x) for x in st['share_reaching'])} | "
                f"{st['requested_capacity']:.3f} | "
                + " | ".join(_fmt(by.get(lang)) for lang in langs) + " |")
        lines.append("")
    cmr = [(label, l) for label, _, s in models for l in s["layers"] if l.get("cmr")]
    if cmr:
        langs = sorted({k for _, l in cmr for k in l["cmr"]["gate_share_by_target_language"]})
        lines += ["## CMR gate share", "",
                  "Mean CMR gate g over the layer's tokens: the MoE layer's share of the FFN "
                  "output, (1 - g) going to the shared dense FFN (--moe-cmr).", "",
                  "| model | layer | gate share | "
                  + " | ".join(f"→{lang}" for lang in langs) + " |",
                  "| --- | --- | ---: | " + " | ".join("---:" for _ in langs) + " |"]
        for label, l in cmr:
            by = l["cmr"]["gate_share_by_target_language"]
            lines.append(f"| {label} | {l['name']} | {l['cmr']['gate_share']:.3f} | "
                         + " | ".join(_fmt(by.get(lang)) for lang in langs) + " |")
        lines.append("")
    moec = [(label, l) for label, _, s in models for l in s["layers"] if l.get("clusters")]
    if moec:
        lines += ["## MoEC clusters", "",
                  "| model | layer | load share per cluster | within-cluster CV |",
                  "| --- | --- | --- | --- |"]
        for label, l in moec:
            c = l["clusters"]
            lines.append(f"| {label} | {l['name']} | "
                         f"{' / '.join(_pct(x) for x in c['load_share'])} | "
                         f"{' / '.join(f'{x:.2f}' for x in c['within_cluster_cv'])} |")
        lines.append("")
    lines += ["## Figures", ""]
    for name in figures:
        lines += [f"![{name}]({name})", "", CAPTIONS.get(name, ""), ""]
    return "\n".join(lines)


def write_report(models: Sequence[Tuple[str, dict, dict]], split: str, out_dir: str) -> dict:
    """Figures, ``report.json`` and ``report.md`` into ``out_dir`` (created); the JSON
    document. The two text files are written whole or not at all."""
    os.makedirs(out_dir, exist_ok=True)
    figures = routing_figures.draw_all([(label, s) for label, _, s in models], out_dir)
    doc = {"split": split,
           "models": [{"label": label, **meta, **s} for label, meta, s in models],
           "figures": figures}
    text = json.dumps(doc, indent=1).encode()
    write_atomically(os.path.join(out_dir, "report.json"), lambda f: f.write(text))
    md = markdown(models, split, figures).encode("utf-8")
    write_atomically(os.path.join(out_dir, "report.md"), lambda f: f.write(md))
    return doc
