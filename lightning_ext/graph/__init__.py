"""Graph learning: the GCN node classifier and the Planetoid DataModule (PyG, the `[graph]` extra)."""
