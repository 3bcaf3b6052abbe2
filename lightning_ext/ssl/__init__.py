"""Self-supervised learning: pure losses (:mod:`.losses`), the shared LightningModule base, FroSSL, VICReg, Barlow
Twins, SimCLR, multi-view augmentation, the online linear probe and the kNN evaluation callback."""
