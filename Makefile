# moe_fairseq: install / test plumbing (GNU make).
#
#   make venv       create .venv and install everything (skipped when up to date)
#   make test       run the test suite (PYTEST_ARGS="-k foo" to pass arguments)
#   make demo       the main job: Bible m4 subset, tiny dense vs MoE vs SMoE on CPU, BLEU/chrF table
#   make bench      CPU micro-benchmark of the MoE layer
#   make gpu-check  on a CUDA machine: gpu tests, fp16/bf16 training, layer and decoding benchmarks (<= ~5 min)
#   make gpu-compare  dense vs MoE vs SMoE vs MoEC, same training time each, Bible m4, BLEU/chrF
#                   (base models on CUDA in one 9-minute call, tiny on CPU; GPU_COMPARE_ARGS="--data DIR ...")
#   make quality    the same comparison on 2 CPU cores within 100 minutes, at a size that
#                   translates (run it alone; QUALITY_ARGS="--plan" prints the time budget)
#   make quality-nllb  MoE vs MoE+EOM vs MoE+CMR (NLLB-MoE's regularizers) the same way, with
#                   ru low- and sw, tl very-low-resource (105 minutes; QUALITY_ARGS passes flags)
#   make specialization  the FashionMNIST expert-specialization study (arXiv 2302.14703), 3 seeds,
#                   ~35 min on 2 cores (SPEC_ARGS="--seeds 5 --dataset mnist ..." passes flags)
#   make clean      remove build artefacts (keeps .venv)
#   make distclean  clean + remove .venv

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.install-stamp
PYTEST_ARGS ?=
GPU_COMPARE_ARGS ?=
SPEC_ARGS   ?= --dataset fmnist --seeds 3 --jobs 2

TORCH_REQ   := torch==2.13.0
FAIRSEQ_REQ := ve-fairseq==0.12.3

.DEFAULT_GOAL := venv
.PHONY: venv test demo bench gpu-check gpu-compare quality quality-nllb specialization clean distclean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# fairseq (ve-fairseq = fairseq main, prebuilt wheels for py3.11/3.12) goes in
# with --no-deps: its metadata drags torchaudio and a different, multi-GB
# torch. Its real runtime dependencies are in requirements.txt / setup.py.
$(STAMP): requirements.txt setup.py | $(PY)
	$(PY) -m pip install $(TORCH_REQ)
	$(PY) -m pip install --no-deps $(FAIRSEQ_REQ)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -e .
	$(PY) moe_fairseq/autoload.py install
	touch $@

# Two test processes by default (the CI machine's cores), test files kept whole per
# process so module fixtures run once; TEST_JOBS=0 runs the suite in this process.
TEST_JOBS ?= 2
test: venv
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile tests $(PYTEST_ARGS)

demo: venv
	bash examples/bible/demo.sh

# PASSIVE: idle OpenMP threads sleep instead of spinning, so a benchmark on a
# shared 2-core machine measures the layer, not the scheduler.
bench: venv
	OMP_WAIT_POLICY=PASSIVE $(PY) scripts/bench_moe_layer.py --device cpu --dtype float32 \
		--tokens 4096 --embed-dim 256 --ffn-dim 1024 --experts 8 --top-k 2

# FashionMNIST: apt-get install dataset-fashion-mnist; MNIST: see README.
specialization: venv
	$(PY) scripts/specialization_study.py $(SPEC_ARGS)

# The lent GPU machine has no .venv (its python3 holds torch; fairseq comes as
# carried wheels on PYTHONPATH): use the venv only where it exists.
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)

# No venv prerequisite: the GPU machine has no network to build one (run make venv
# first on a fresh CPU checkout).
gpu-compare:
	$(GPU_PY) scripts/gpu_compare.py $(GPU_COMPARE_ARGS)

gpu-check:
	$(GPU_PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

quality: venv
	OMP_WAIT_POLICY=PASSIVE $(PY) scripts/quality.py $(QUALITY_ARGS)

# NLLB-MoE's claim: EOM and CMR help the low-resource directions. m4's languages with
# ru cut to 8,000 and sw, tl to 2,000 training verses (prepare_bible.py's levels);
# 30 minutes of training each, gaps taken against moe.
NLLB_QUALITY_ARGS := --methods "moe moe+eom moe+cmr" --budget-seconds 1800 --limit-seconds 6300 \
	--data runs/quality-nllb/data --out runs/quality-nllb \
	"--prepare-args=--langs de,ru:low,sw:very_low,tl:very_low --vocab-size 8000"
quality-nllb: venv
	OMP_WAIT_POLICY=PASSIVE $(PY) scripts/quality.py $(NLLB_QUALITY_ARGS) $(QUALITY_ARGS)

clean:
	rm -rf build dist .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -path ./.git -prune -o \
		\( -name __pycache__ -type d -prune -exec rm -rf {} + \) -o \
		\( -name '*.pyc' -type f -exec rm -f {} + \)

distclean: clean
	rm -rf $(VENV)
