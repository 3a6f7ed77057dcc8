"""Single-cell annotation: per-cell T-cell, lineage, memory and state calls.

:mod:`~blinaprofile.annotate.config` (typed ``configs/single_cell.yaml``) ->
:mod:`~blinaprofile.annotate.mixtures` (Gaussian mixtures on CLR protein, negative-binomial
mixtures on gene-set counts) -> :mod:`~blinaprofile.annotate.annotator` (:func:`annotate`).
"""
