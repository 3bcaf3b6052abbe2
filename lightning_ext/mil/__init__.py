"""Multiple-instance learning: TransMIL, ABMIL and pooling aggregators, MILClassifier, BagDataModule."""
