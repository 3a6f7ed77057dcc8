"""Inputs and outputs: FCS reading (:mod:`~blinaprofile.io.fcs`) and writing
(:mod:`~blinaprofile.io.fcs_write`), single-cell readers (:mod:`~blinaprofile.io.singlecell`),
manifests and feature tables (:mod:`~blinaprofile.io.read`), the privacy filter
(:mod:`~blinaprofile.io.privacy`) and atomic writes (:mod:`~blinaprofile.io.atomic`).

Modules are imported on use (reading an FCS file never imports anndata).
"""
