"""The simulator: a documented generative model of a cohort
(:mod:`~blinaprofile.simulate.cohort`) drawn as FCS files with per-event truth
(:mod:`~blinaprofile.simulate.flow`) or as single-cell objects
(:mod:`~blinaprofile.simulate.singlecell`).
"""
