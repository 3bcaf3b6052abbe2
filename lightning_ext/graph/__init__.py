"""Graph learning: the GCN node classifier and the Planetoid DataModule (PyG, the `[graph]` extra).

Link prediction: LinkPredictionDataModule (RandomLinkSplit), Hits@K/MRR, GAE, NCN, NCNC, NetInfoF Probe/Act.
"""
