"""Scoring: one sample (:mod:`~blinaprofile.scoring.score`), many samples in parallel or on
Dask (:mod:`~blinaprofile.scoring.batch`) and the HTML report
(:mod:`~blinaprofile.scoring.report`, a Jinja2 template in ``templates/``).
"""
