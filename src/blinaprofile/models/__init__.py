"""Models: validation (:mod:`~blinaprofile.models.validation`: pipelines, nested grouped CV,
permutation null), metrics with CIs (:mod:`~blinaprofile.models.metrics`), packaging and the
runtime (:mod:`~blinaprofile.models.packaging`), training and MLflow tracking
(:mod:`~blinaprofile.models.train`, :mod:`~blinaprofile.models.tracking`) and the
leaderboard (:mod:`~blinaprofile.models.compare`).
"""
