"""The README's recipe for your own parallel text, steps 1 (SentencePiece) and 2
(fairseq-preprocess), run as the README writes them on a corpus far smaller than its
vocab_size: the vocabulary shrinks to what the text allows instead of stopping."""

import os
import random
import re
import subprocess
import sys

from conftest import REPO_ROOT, subprocess_env


def readme_block(after: str) -> str:
    """The first ```bash block of README.md after the line starting with ``after``."""
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(after)
    m = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    return m.group(1)


def test_subwords_and_binarize_as_written_on_a_small_corpus(tmp_path):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    (tmp_path / "raw").mkdir()
    for split, n in (("train", 2000), ("valid", 50), ("test", 50)):
        for lang in ("de", "en"):
            (tmp_path / "raw" / f"{split}.{lang}").write_text(
                "".join(" ".join(rng.choices(words, k=8)) + "\n" for _ in range(n)))
    subwords = readme_block("1. Subwords")
    binarize = readme_block("2. Binarize")
    assert subwords.startswith(". .venv/bin/activate\n") and "vocab_size=8000" in subwords
    # the activation line is relative to the repository: the venv is activated here
    script = subwords.replace(". .venv/bin/activate\n", "") + binarize
    env = subprocess_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm" / "spm.model"))
    assert sp.get_piece_size() < 8000  # 300 words: as many pieces as the text allows
    out = tmp_path / "data-bin" / "my_corpus"
    for name in ("dict.de.txt", "dict.en.txt", "test.de-en.de.bin", "train.de-en.en.idx"):
        assert (out / name).is_file(), name
    assert (tmp_path / "spm" / "test.en").read_text().count("\n") == 50
