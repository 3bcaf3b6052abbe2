"""Graph learning: the GCN node classifier and the Planetoid DataModule (PyG, the `[graph]` extra).

Link prediction: LinkPredictionDataModule (RandomLinkSplit), Hits@K/MRR, GAE, NCN, NCNC, NetInfoF Probe/Act.
Architecture search: Auto-GNN (AutoGNNSearch, SearchedGNN; auto_gnn.py, auto_gnn_search.py).
"""
