"""Federated learning on Flower: any LightningModule and DataModule as a stateful Flower client, an in-process
simulation driver, seeded partitioners, and federated methods (FedWon, ...). Flower (``flwr``) is the
``[federated]`` extra and is imported lazily."""
