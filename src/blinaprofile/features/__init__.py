"""Per-sample features: the versioned schema (:mod:`~blinaprofile.features.schema`, the one
list of feature columns) and its featurizers for flow (:mod:`~blinaprofile.features.flow`,
from gate counts) and single-cell data (:mod:`~blinaprofile.features.singlecell`, from
annotation labels).
"""
