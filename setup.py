from setuptools import find_packages, setup

# NOTE: fairseq itself is deliberately NOT listed in install_requires.
# fairseq main is installed separately with `pip install --no-deps
# ve-fairseq==0.12.3` (prebuilt wheels for py3.11/3.12, see the Makefile):
# its metadata pulls in torchaudio and would make pip fetch a different,
# multi-GB torch build. Instead, fairseq's real runtime dependencies are
# listed here so that they still get installed.
setup(
    name="moe_fairseq",
    version="0.1.0",
    description="Mixture-of-Experts plugin for fairseq machine translation",
    python_requires=">=3.11",
    packages=find_packages(include=["moe_fairseq", "moe_fairseq.*"]),
    install_requires=[
        "torch>=2.6",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "bitarray",
        "regex",
        "sacrebleu>=2.0",
        "numpy",
        "tqdm",
        "cython",
        "cffi",
        "scikit-learn",
        "packaging",
        "sentencepiece",
        "tensorboard",
    ],
    extras_require={"test": ["pytest"]},
)
