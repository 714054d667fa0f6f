"""Datasets, the classifier, the run pipeline and the results tables."""
