import os
import runpy

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

AUTOLOAD = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "moe_fairseq", "autoload.py"), run_name="setup")


class build_py_with_autoload(build_py):
    """Also put moe_fairseq-autoload.pth at the root of the installed files, so that
    fairseq's tools load the plugin without --user-dir (see moe_fairseq/autoload.py;
    editable installs get it from `python moe_fairseq/autoload.py install`)."""

    def run(self):
        super().run()
        with open(self._pth(), "w") as f:
            f.write(AUTOLOAD["PTH_LINE"])

    def _pth(self):
        return os.path.join(self.build_lib, AUTOLOAD["PTH_NAME"])

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [self._pth()]


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
        # only so that every fairseq tool stops logging "Please install tensorboardX"
        # (fairseq's text_to_speech task, imported at start-up, asks for it)
        "tensorboardX",
    ],
    # Triton is not a run-time requirement: CUDA builds of torch bring the one they need,
    # and without it the layer keeps its PyTorch path. The tests pin 3.9, whose
    # interpreter runs the kernels on CPU with numpy 2.4 (the GPU machine has 3.6, whose
    # interpreter needs numpy < 2.4).
    extras_require={"test": ["pytest", "pytest-xdist", 'triton==3.9.0; platform_system == "Linux" and '
                                       'platform_machine == "x86_64"']},
    cmdclass={"build_py": build_py_with_autoload},
)
