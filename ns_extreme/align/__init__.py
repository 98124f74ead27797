"""Bias alignment tooling: pair lists (``pairs``), evaluation metrics (``metrics``) and plots (``plots``).

Pairs are mined from posed collections (COLMAP models, ``transforms.json`` datasets, the MegaUnScene
layout) or imported from the paper's pair files, and labelled large / small / none with the paper's
field-of-view overlap rule (``ns_extreme.geometry.overlap``).
"""
