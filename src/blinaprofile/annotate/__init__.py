"""Single-cell annotation: per-cell T-cell, lineage, memory and state calls.

:mod:`~blinaprofile.annotate.config` (typed ``configs/single_cell.yaml``) ->
:mod:`~blinaprofile.annotate.inputs` (what is read, cell QC) ->
:mod:`~blinaprofile.annotate.rna` (gene-set genes, scores, control genes) ->
:mod:`~blinaprofile.annotate.mixtures` (Gaussian mixtures on CLR protein, negative-binomial
mixtures on gene-set counts, Gaussian mixtures on normalised scores, per-sample priors) ->
:mod:`~blinaprofile.annotate.cascade` (the label cascade, fitted or applied; the partial
memory split ``bp_effector`` in :mod:`~blinaprofile.annotate.effector`) ->
:mod:`~blinaprofile.annotate.estimator` (:class:`TCellAnnotator`: ``fit``/``transform``,
``to_dict``/``from_dict``) -> :mod:`~blinaprofile.annotate.annotator` (:func:`annotate`).
"""
