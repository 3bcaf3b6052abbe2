"""Functional pieces shared by the graph recommenders: sparse bipartite graphs and their propagation."""

from lightning_ext.recsys.graph import SparseGraph, bipartite_graph, spmm, symmetric_norm_values

__all__ = ["SparseGraph", "bipartite_graph", "spmm", "symmetric_norm_values"]
