"""Deep metric learning: ABE (attention-based ensemble), pair losses, Recall@K on unseen classes."""
