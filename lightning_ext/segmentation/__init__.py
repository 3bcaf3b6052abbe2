"""2D segmentation: R2U-Net and U-Net, a SegmentationModule (Dice + BCE/CE), and an offline digit-mask task."""
