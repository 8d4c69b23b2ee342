"""The routing report (scripts/routing_report.py) and the routing views in TensorBoard.

- I(expert; language) of the report's counts is log2(L) for a router that sends each
  language to its own expert and 0 for one that ignores the language (real MoE layers
  with hand-set router weights);
- on tiny trained MoE, SMoE and MoEC models (multilingual task, two target languages),
  the report runs, every figure is a valid PNG of non-trivial size, and report.json's
  numbers equal those computed directly: the layer's own running load counter, the
  first choices labelled by the language tokens in the batch (not by the direction the
  report routes), SMoE's requested capacity as the training criterion counts it;
- in the figures (also with values at their maxima), no legend overlaps an axes box,
  no bar or line reaches the top of its frame, and expert_load's legends name each
  SMoE stratum and MoEC cluster in its bars' colour;
- with --tensorboard-logdir, training writes an expert-load histogram per MoE layer and
  I(expert; target language) at every log interval, and 2 expert-parallel ranks write
  the same histograms as 1 process that sees the union of their batches.
"""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, USER_DIR, run_cli, subprocess_env

MULTI_TASK_ARGS = [
    "--task", "translation_multi_simple_epoch",
    "--lang-pairs", "a-b,a-c",
    "--encoder-langtok", "tgt", "--decoder-langtok",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------ hand-built routers


def _language_tokens(num_langs: int, per_lang: int, dim: int, seed: int = 0):
    """Tokens ``[L * per_lang, dim]``: dims 0..L-1 one-hot the language (times 4); the
    other dims are one shared random pattern set, the same for every language."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(per_lang, dim - num_langs, generator=g)
    rows = []
    for lang in range(num_langs):
        onehot = torch.zeros(per_lang, num_langs)
        onehot[:, lang] = 4.0
        rows.append(torch.cat([onehot, shared], dim=1))
    return rows


def _layer_with_router_weights(weight: torch.Tensor):
    from moe_fairseq.layer.expert_bank import ExpertBank
    from moe_fairseq.layer.moe_layer import MoELayer
    from moe_fairseq.routers.top_k import TopKRouter

    E, d = weight.shape
    router = TopKRouter(d, E, top_k=1)
    linear = [m for m in router.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 1 and linear[0].weight.shape == (E, d)
    with torch.no_grad():
        linear[0].weight.copy_(weight)
        if linear[0].bias is not None:
            linear[0].bias.zero_()
    layer = MoELayer(router, ExpertBank(E, d, 2 * d)).eval()
    layer.record_first_expert = True
    return layer


@pytest.mark.parametrize("routing", ["by_language", "language_blind"])
def test_mutual_information_of_hand_built_routers(routing):
    from moe_fairseq.analysis.routing_counts import LayerInfo, RoutingCounts

    L, dim, per_lang = 4, 10, 50
    weight = torch.zeros(L, dim)
    if routing == "by_language":
        weight[:, :L] = torch.eye(L)  # expert e scores language e's one-hot dim
    else:
        weight[:, L:] = torch.randn(L, dim - L, generator=torch.Generator().manual_seed(1))
    layer = _layer_with_router_weights(weight)
    directions = [f"x-{chr(ord('a') + lang)}" for lang in range(L)]
    counts = RoutingCounts([LayerInfo.of("enc.moe", layer)], directions)
    with torch.no_grad():
        for direction, tokens in zip(directions, _language_tokens(L, per_lang, dim)):
            layer(tokens)
            counts.add(0, direction, layer.stats)
    summary = counts.summary()["layers"][0]
    target = summary["target_language"]
    assert target["h_language_bits"] == pytest.approx(math.log2(L), abs=1e-12)
    assert summary["source_language"]["mi_bits"] == 0.0  # one source language
    if routing == "by_language":
        assert target["mi_bits"] == pytest.approx(math.log2(L), abs=1e-9)
        assert target["share"] == [[1.0 if e == lang else 0.0 for e in range(L)]
                                   for lang in range(L)]
        assert target["top_expert"] == {chr(ord("a") + lang): lang for lang in range(L)}
    else:
        assert target["mi_bits"] == pytest.approx(0.0, abs=1e-9)
        # the experts are used (not a degenerate all-to-one router), identically per language
        assert len({e for e, n in enumerate(summary["first_choice"]) if n > 0}) >= 2
        assert all(row == target["share"][0] for row in target["share"])
    assert summary["tokens"] == L * per_lang
    assert sum(summary["load"]) == L * per_lang  # top-1: one assignment per token


def test_cluster_and_load_summaries_by_hand():
    from moe_fairseq.analysis.routing_counts import cluster_summary, describe_load

    load = torch.tensor([10, 30, 0, 40])
    d = describe_load(load)
    assert d["load_share"] == [0.125, 0.375, 0.0, 0.5]
    assert d["starved"] == [2]  # < 10% of the fair share (2 of 20)
    mean = 20.0
    std = math.sqrt(((10 - mean) ** 2 + (30 - mean) ** 2 + mean ** 2 + (40 - mean) ** 2) / 4)
    assert d["load_cv"] == pytest.approx(std / mean)
    c = cluster_summary(load, 2)
    assert c["load_share"] == [0.5, 0.5]
    assert c["within_cluster_cv"] == pytest.approx([10 / 20, 20 / 20])


# ------------------------------------------------------------ trained models


def _train(data, save_dir, arch, *extra):
    run_cli("train", [
        data, "--user-dir", USER_DIR, *MULTI_TASK_ARGS, "--arch", arch,
        "--moe-expert-count", "4", "--moe-freq", "2",
        "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "3e-3", "--max-tokens", "1000",
        "--max-update", "8", "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--cpu", "--num-workers", "0", "--seed", "1", "--disable-validation",
        "--log-format", "json", "--log-interval", "2", "--no-progress-bar", *extra,
    ])
    return save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def models(multilingual_data_bin, tmp_path_factory):
    root = tmp_path_factory.mktemp("routing_models")
    return multilingual_data_bin, {
        "moe": _train(multilingual_data_bin, root / "moe", "moe_transformer_tiny",
                      "--tensorboard-logdir", root / "moe_tb"),
        "smoe": _train(multilingual_data_bin, root / "smoe", "smoe_transformer_tiny"),
        "moec": _train(multilingual_data_bin, root / "moec", "moec_transformer_tiny"),
    }, root


def routing_report(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "routing_report.py"),
                           *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)


@pytest.fixture(scope="module")
def report(models):
    data, paths, root = models
    out = root / "report"
    proc = routing_report(*[a for label in ("moe", "smoe", "moec")
                            for a in ("--path", paths[label], "--label", label)],
                          "--data", data, "--split", "test", "--out", out, "--cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), proc.stdout


def test_every_figure_is_a_valid_png(report):
    from PIL import Image

    out, doc, stdout = report
    assert doc["figures"] == [
        "heatmap_target_language.png", "heatmap_source_language.png", "expert_load.png",
        "mutual_information.png", "entropies.png", "smoe_strata.png", "moec_clusters.png"]
    md = (out / "report.md").read_text()
    for name in doc["figures"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 15_000, f"{name}: {len(data)} bytes"
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert min(image.size) >= 250, (name, image.size)
            # a drawn figure, not a blank canvas
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20, name
        assert f"![{name}]({name})" in md
    assert f"routing report (7 figures): {out / 'report.md'}" in stdout
    for label in ("moe", "smoe", "moec"):
        assert f"| {label} |" in md


def _direct_counts(data, path):
    """Per MoE layer, counted without RoutingCounts: the layer's own running load
    counter, and (first expert, target language) pairs with the language read from the
    batch's language tokens; SMoE's requested-capacity counts as the criterion makes them."""
    from collections import Counter

    from fairseq import checkpoint_utils, utils

    from moe_fairseq.analysis.specialization import joint_counts
    from moe_fairseq.layer.moe_layer import MoELayer
    from moe_fairseq.layer.requested_capacity import capacity_counts, capacity_summary
    from moe_fairseq.target_language import target_language_index

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": str(data)})
    model = models[0].eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
    joint, first_choice, capacity = {}, {}, Counter()
    for _, m in layers:
        m.reset_expert_load()
        m.record_first_expert = True
    task.load_dataset("test")  # every direction together, batches mixed
    itr = task.get_batch_iterator(
        dataset=task.dataset("test"), max_tokens=4000,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True).next_epoch_itr(shuffle=False)
    with torch.no_grad():
        for sample in itr:
            model(**sample["net_input"])
            index, names = target_language_index(task, sample)
            capacity.update(capacity_counts([m.stats for _, m in layers], task, sample))
            for name, m in layers:
                first = m.stats.first_expert
                lang = index[None, :].expand_as(first)
                keep = (first >= 0) & (lang >= 0)
                c = joint_counts(first[keep], lang[keep], m.num_experts, len(names))
                joint[name] = joint.get(name, 0) + c
                # the first pass's first choices (MoEStats.first_choice_load counts every pass)
                first_choice[name] = first_choice.get(name, 0) + torch.bincount(
                    first[first >= 0], minlength=m.num_experts)
    load = {name: m.expert_load_total.tolist() for name, m in layers}
    return load, joint, first_choice, names, capacity_summary(capacity)


@pytest.mark.parametrize("label", ["moe", "smoe", "moec"])
def test_report_numbers_equal_direct_counts(models, report, label):
    from moe_fairseq.analysis.specialization import mutual_information_bits

    data, paths, _ = models
    _, doc, _ = report
    model = next(m for m in doc["models"] if m["label"] == label)
    load, joint, first_choice, names, capacity = _direct_counts(data, paths[label])
    assert [l["name"] + ".moe" for l in model["layers"]] == list(load)
    assert model["directions"] == ["a-b", "a-c"] and model["num_updates"] == 8
    for layer in model["layers"]:
        name = layer["name"] + ".moe"
        assert layer["load"] == load[name]
        total = sum(load[name])
        assert layer["load_share"] == pytest.approx([x / total for x in load[name]], abs=1e-12)
        assert layer["first_choice"] == first_choice[name].tolist()
        target = layer["target_language"]
        # the report labels tokens by the direction it routes; the direct count by the
        # language token in the batch: the same counts
        direct = joint[name][:, [names.index(lang) for lang in target["languages"]]]
        assert target["counts"] == direct.tolist()
        assert target["mi_bits"] == pytest.approx(mutual_information_bits(direct), abs=1e-12)
        assert 0.0 <= target["mi_bits"] <= target["h_language_bits"] + 1e-12
        assert layer["source_language"]["mi_bits"] == 0.0  # one source language, a
        assert 0.0 <= layer["gate_entropy_bits"] <= layer["usage_entropy_bits"] + 1e-9
        assert layer["usage_entropy_bits"] <= math.log2(4) + 1e-12
        if label == "smoe":
            strata = layer["strata"]
            assert strata["sizes"] == [2, 2] and strata["share_reaching"][0] == 1.0
            assert 1.0 <= strata["requested_capacity"] <= 2.0
        else:
            assert "strata" not in layer
        if label == "moec":
            clusters = layer["clusters"]
            assert clusters["count"] == 2
            assert clusters["load_share"] == pytest.approx(
                [sum(load[name][:2]) / total, sum(load[name][2:]) / total], abs=1e-12)
        else:
            assert "clusters" not in layer
    if label == "smoe":
        # SMoE's requested capacity per target language, over both layers, as the
        # training criterion counts it (requested_capacity.py)
        for lang in ("b", "c"):
            tokens = [l["target_language"]["tokens"][l["target_language"]["languages"].index(lang)]
                      for l in model["layers"]]
            passes = sum(l["strata"]["requested_capacity_by_target_language"][lang] * t
                         for l, t in zip(model["layers"], tokens))
            assert sum(tokens) == capacity["language_tokens"][lang]
            assert passes / sum(tokens) == pytest.approx(capacity["by_target_language"][lang],
                                                         abs=1e-9)


def test_one_direction_and_bad_input(models, tmp_path):
    data, paths, _ = models
    proc = routing_report("--path", paths["moe"], "--data", data, "--lang-pairs", "a-c",
                          "--out", tmp_path / "one", "--cpu", "--max-sentences", "10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "one" / "report.json").read_text())
    assert doc["models"][0]["directions"] == ["a-c"] and doc["models"][0]["label"] == "moe"
    assert "smoe_strata.png" not in doc["figures"]

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for args, says in [
        (["--path", tmp_path / "none.pt", "--out", tmp_path / "r"],
         f"--path {tmp_path / 'none.pt'}: no such checkpoint file"),
        (["--path", paths["moe"], "--out", blocker],
         f"--out {blocker}: {blocker} is a file, not a folder"),
        (["--path", paths["moe"], "--label", "a", "--label", "b", "--out", tmp_path / "r"],
         "--label: give one per --path (1), got 2"),
        (["--path", paths["moe"], "--data", data, "--lang-pairs", "a-x", "--out", tmp_path / "r"],
         f"--lang-pairs a-x: not a direction of {paths['moe']} (it has a-b,a-c)"),
        (["--path", paths["moe"], "--data", data, "--split", "nope", "--out", tmp_path / "r"],
         "--split nope: no such split for any direction (a-b,a-c)"),
    ]:
        proc = routing_report(*args)
        last = [l for l in proc.stderr.splitlines() if l.strip()][-1]
        assert proc.returncode == 2 and says in last, proc.stderr[-2000:]


# ------------------------------------------------------------ figure layout


def _edge_models(models):
    """The report's models with the values that used to end on the frame or sit under a
    legend: SMoE's requested capacity at its maximum (2.0 with 2 strata), every token
    reaching every stratum, I(E; lang) = H(lang), one expert taking all the load, gate
    entropy = log2 E, and 14 target languages (a legend longer than one column)."""
    edge = copy.deepcopy(models)
    for _, s in edge:
        for layer in s["layers"]:
            t = layer["target_language"]
            t["mi_bits"] = t["h_language_bits"]
            layer["gate_entropy_bits"] = layer["max_entropy_bits"]
            if layer.get("strata"):
                st = layer["strata"]
                st["share_reaching"] = [1.0] * len(st["sizes"])
                st["requested_capacity_by_target_language"] = {
                    f"l{i}": 1.0 + i / 13 for i in range(14)}  # l13: 2.0
    first = edge[0][1]["layers"][0]
    first["load_share"] = [1.0] + [0.0] * (first["num_experts"] - 1)
    first["starved"] = list(range(1, first["num_experts"]))
    return edge


@pytest.fixture(scope="module")
def figure_models(report):
    _, doc, _ = report
    real = [(m["label"], m) for m in doc["models"]]
    return {"report": real, "edge": _edge_models(real)}


def _built(figure_models, source, name):
    """The figure ``name`` drawn (layout done) from the models of ``source``, and its renderer."""
    from moe_fairseq.analysis import routing_figures

    fig = dict(routing_figures.FIGURES)[name](figure_models[source])
    fig.canvas.draw()
    return fig, fig.canvas.get_renderer()


def _plotted(ax):
    """The bars, lines and line collections drawn in ``ax`` (not the legend's proxies)."""
    return [*ax.patches, *ax.lines, *ax.collections]


def _highest(ax):
    from matplotlib.collections import LineCollection

    ys = [p.get_y() + p.get_height() for p in ax.patches]
    ys += [y for line in ax.lines for y in line.get_ydata()]
    ys += [seg[:, 1].max() for c in ax.collections if isinstance(c, LineCollection)
           for seg in c.get_segments()]
    return max(y for y in map(float, ys) if math.isfinite(y))


FIGURE_NAMES = ["heatmap_target_language.png", "heatmap_source_language.png",
                "expert_load.png", "mutual_information.png", "entropies.png",
                "smoe_strata.png", "moec_clusters.png"]
LEGENDED = FIGURE_NAMES[2:]


def test_figure_table_is_the_report_order(report):
    from moe_fairseq.analysis import routing_figures

    assert [name for name, _ in routing_figures.FIGURES] == FIGURE_NAMES == report[1]["figures"]


@pytest.mark.parametrize("source", ["report", "edge"])
@pytest.mark.parametrize("name", LEGENDED)
def test_legends_cover_no_data(figure_models, source, name):
    """Every legend lies outside every axes box, and what the axes draw is clipped to its
    box: no legend can hide a bar or a line. The legends stay inside the figure (the
    layout made room for them) and apart from each other."""
    from matplotlib.transforms import Bbox

    fig, renderer = _built(figure_models, source, name)
    data_axes = [ax for ax in fig.axes if ax.axison]
    legends = [ax.get_legend() for ax in data_axes if ax.get_legend() is not None]
    assert len(legends) == len(data_axes), "a legend for every panel with data"
    boxes = [legend.get_window_extent(renderer) for legend in legends]
    for box in boxes:
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1), name
        for ax in fig.axes:
            assert not box.overlaps(ax.bbox), f"{name}: legend over {ax.get_title()!r}"
    for i, a in enumerate(boxes):
        assert not any(a.overlaps(b) for b in boxes[i + 1:]), f"{name}: legends overlap"
    for ax in data_axes:
        artists = _plotted(ax)
        assert artists
        for artist in artists:
            assert artist.get_clip_on(), (name, artist)
            assert list(artist.get_clip_box().extents) == pytest.approx(list(ax.bbox.extents))
            box = Bbox.intersection(artist.get_window_extent(renderer), ax.bbox)  # shown part
            assert box is None or not any(box.overlaps(b) for b in boxes), (name, artist)


@pytest.mark.parametrize("source", ["report", "edge"])
@pytest.mark.parametrize("name", LEGENDED)
def test_bars_end_below_the_frame(figure_models, source, name):
    """The y axis goes at least 5% of its range above the highest bar or reference line
    (the tallest bar, e.g. a requested capacity of 2.0 with 2 strata, never touches the
    frame), and starts at or below the lowest bar top shown."""
    fig, _ = _built(figure_models, source, name)
    for ax in (ax for ax in fig.axes if ax.axison):
        bottom, top = ax.get_ylim()
        highest = _highest(ax)
        assert top - highest >= 0.05 * (top - bottom), (name, ax.get_title(), highest, top)
    if source == "edge" and name == "smoe_strata.png":
        capacity = fig.axes[1]
        assert _highest(capacity) == pytest.approx(2.0) and capacity.get_ylim()[1] > 2.05


@pytest.mark.parametrize("source", ["report", "edge"])
def test_expert_load_legend_names_strata_and_clusters(figure_models, source):
    """expert_load.png: an SMoE panel's legend has one entry per stratum in the colour of
    its experts' bars (a MoEC panel: per cluster); a plain MoE panel names no group."""
    from matplotlib.colors import to_rgba

    models = figure_models[source]
    fig, _ = _built(figure_models, source, "expert_load.png")
    axes = iter(fig.axes)
    panels = {}
    for name in [l["name"] for l in models[0][1]["layers"]]:  # rows: layers, columns: models
        for label, s in models:
            panels[label, name] = next(axes), next(l for l in s["layers"] if l["name"] == name)
    for (label, _), (ax, layer) in panels.items():
        legend = ax.get_legend()
        texts = [t.get_text() for t in legend.get_texts()]
        assert "fair share 1/E" in texts
        assert ("starved (< 10% of 1/E)" in texts) == bool(layer["starved"])
        groups = [(t, h) for t, h in zip(texts, legend.legend_handles)
                  if t.startswith(("stratum", "cluster"))]
        if label == "moe":
            assert groups == []
            continue
        if label == "smoe":
            kind, sizes = "stratum", layer["strata"]["sizes"]
        else:
            c = layer["clusters"]
            kind, sizes = "cluster", [c["cluster_size"]] * c["count"]
        assert [t.split(" (")[0] for t, _ in groups] == [f"{kind} {g}" for g in range(len(sizes))]
        first = 0
        for (_, handle), size in zip(groups, sizes):
            for e in range(first, first + size):
                if e not in layer["starved"]:  # starved bars are red
                    assert to_rgba(ax.patches[e].get_facecolor()) == to_rgba(handle.get_facecolor())
            first += size
    smoe = [p for (label, _), p in panels.items() if label == "smoe"]
    assert smoe and all(len(layer["strata"]["sizes"]) == 2 for _, layer in smoe)


# ------------------------------------------------------------ TensorBoard


def _tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"histograms": 0, "scalars": 0})
    ea.Reload()
    return ea


def test_training_writes_routing_histograms_and_mi(models):
    _, _, root = models
    ea = _tensorboard(root / "moe_tb" / "train_inner")
    layers = ["encoder.layers.1", "decoder.layers.1"]
    assert sorted(ea.Tags()["histograms"]) == sorted(f"moe_expert_load/{l}" for l in layers)
    for layer in layers:
        events = ea.Histograms(f"moe_expert_load/{layer}")
        assert [e.step for e in events] == [2, 4, 6, 8]  # every --log-interval
        for e in events:
            h = e.histogram_value
            assert list(h.bucket_limit) == [0.5, 1.5, 2.5, 3.5]  # one bucket per expert
            assert sum(h.bucket) == h.num > 0
        mi = ea.Scalars(f"moe_mi_target_lang_bits/{layer}")
        assert [e.step for e in mi] == [2, 4, 6, 8]
        assert all(0.0 <= e.value <= 1.0 + 1e-6 for e in mi)  # two target languages


def _histograms(folder):
    ea = _tensorboard(folder)
    return {tag: [(e.step, list(e.histogram_value.bucket)) for e in ea.Histograms(tag)]
            for tag in ea.Tags()["histograms"]}


def test_two_expert_parallel_ranks_write_the_histograms_of_one_process(data_bin, tmp_path):
    from test_expert_parallel_train import train

    logs = {}
    for world, extra in ((1, ["--update-freq", "2"]), (2, [])):
        tb = tmp_path / f"tb{world}"
        train(data_bin, tmp_path / f"w{world}", world, tmp_path, "--max-update", "4",
              "--log-interval", "2", "--tensorboard-logdir", tb, *extra, tag=f"tb{world}")
        logs[world] = _histograms(tb / "train_inner")
    assert sorted(logs[1]) == ["moe_expert_load/decoder.layers.1",
                               "moe_expert_load/encoder.layers.1"]
    assert logs[2] == logs[1]
    assert all(len(v) == 2 for v in logs[1].values())  # updates 2 and 4


def test_bilingual_checkpoint(trained, tmp_path):
    """A ``translation`` checkpoint: one direction, from the task's --source/--target-lang."""
    proc = routing_report("--path", trained.checkpoint_last, "--data", trained.data,
                          "--out", tmp_path, "--cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "report.json").read_text())
    (model,) = doc["models"]
    assert model["directions"] == ["src-tgt"] and model["label"] == "checkpoints"
    for layer in model["layers"]:
        assert layer["target_language"]["languages"] == ["tgt"]
        assert layer["target_language"]["mi_bits"] == 0.0
        assert sum(layer["first_choice"]) == layer["tokens"] > 0
