"""Prior-data fitted networks (PFN, TabPFN): priors that sample whole datasets, the PFN transformer and its
scikit-learn front end.

Everything here needs only the base install (torch, Lightning, scikit-learn).
"""
