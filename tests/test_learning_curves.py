"""Learning curves from fairseq-train logs (moe_fairseq/analysis/learning_curves.py):
points read from constructed logs in fairseq's json and text formats, one from a real
tiny training run, and the figure checked as a real PNG with a line per run."""

import json

import numpy as np

from moe_fairseq.analysis import learning_curves as lc


def fake_log(points, start="2026-12-05 07:00:00", scale=1.0):
    lines = [f"{start} | INFO | fairseq_cli.train | task: translation_multi_simple_epoch",
             "2026-12-05 07:00:05 | INFO | fairseq.trainer | begin training epoch 1"]
    for i, (upd, loss) in enumerate(points):
        record = {"epoch": i + 1, "valid_loss": f"{loss:.3f}", "valid_ppl": "99",
                  "valid_num_updates": str(upd), "valid_best_loss": f"{loss:.3f}"}
        second = 5 + int(scale * 10 * (i + 1))
        lines.append(f"2026-12-05 07:{second // 60:02d}:{second % 60:02d} | INFO | valid | "
                     + json.dumps(record))
        lines.append("2026-12-05 07:59:59 | INFO | train | {\"train_loss\": \"3\"}")
    return "\n".join(lines) + "\n"


def test_points_from_a_json_log():
    pts = lc.valid_points(fake_log([(100, 8.5), (200, 7.25), (300, 6.5)]))
    assert [p["updates"] for p in pts] == [100, 200, 300]
    assert [p["loss"] for p in pts] == [8.5, 7.25, 6.5]
    # seconds from "begin training epoch" (07:00:05), not from the first line
    assert [p["seconds"] for p in pts] == [10.0, 20.0, 30.0]
    assert [p["epoch"] for p in pts] == [1.0, 2.0, 3.0]
    assert lc.valid_points("no records here\n") == []


def test_figure_is_a_png_with_a_line_per_run(tmp_path):
    import matplotlib.image as mpimg

    curves = {"dense": lc.valid_points(fake_log([(100, 8.5), (200, 7.2), (300, 6.6)])),
              "moe": lc.valid_points(fake_log([(80, 8.3), (160, 6.9), (240, 6.1)], scale=1.3)),
              "smoe": []}
    path = lc.plot_learning_curves(curves, str(tmp_path / "curves.png"), "m4, 60 s each")
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    img = mpimg.imread(path)
    assert img.shape[0] >= 400 and img.shape[1] >= 1000
    rgb = img[..., :3].reshape(-1, 3)
    # matplotlib's first two default colours (blue, orange) are drawn: the two lines
    blue, orange = np.array([0.12, 0.47, 0.71]), np.array([1.0, 0.5, 0.05])
    for colour in (blue, orange):
        assert (np.abs(rgb - colour).max(axis=1) < 0.05).sum() > 200
    md = "\n".join(lc.curves_markdown(curves))
    assert "| moe | 3 | 240 | 39 | 6.100 | 6.100 |" in md
    assert "| smoe | 0 | – |" in md


def test_points_from_a_real_training_log(trained):
    """The tiny model the suite trains (conftest ``trained``) logs validation each
    epoch: its log gives one point per epoch, updates increasing, losses finite."""
    log = trained.stdout + trained.stderr
    pts = lc.valid_points(log)
    assert pts and all(np.isfinite(p["loss"]) for p in pts)
    assert [p["updates"] for p in pts] == sorted(p["updates"] for p in pts)
