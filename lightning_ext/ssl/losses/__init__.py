"""Self-supervised losses as pure functions of view embeddings (exact-gradient cross-rank gather included).

Import them from their modules (``from lightning_ext.ssl.losses.frossl import frossl_loss``)."""
