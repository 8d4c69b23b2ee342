"""The expert-specialization study of Krishnamurthy et al. (arXiv 2302.14703) on
FashionMNIST: a dense expectation MoE of small CNN experts, a softmax or attentive
gate, and the sample-similarity loss. Not translation, so it lives under examples/;
the losses and metrics it uses are the package's own (moe_fairseq.routers.losses,
moe_fairseq.analysis.specialization). Run it with scripts/specialization_study.py.
"""
