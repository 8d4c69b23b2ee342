"""The cluster-structure study of Chen et al., "Towards Understanding the
Mixture-of-Experts Layer in Deep Learning" (NeurIPS 2022, arXiv 2208.02813): the
synthetic data with K clusters (``data``), the authors' patch classifiers and MoE
built on the package's own layer (``models``), and their training rules (``train``).
Not translation, so it lives under examples/.
"""
