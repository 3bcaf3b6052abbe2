"""Vision and generic classifiers: :class:`~lightning_ext.vision.classifier.Classifier` (the core every classifier
shares), :class:`~lightning_ext.vision.image_classifier.ImageClassifier` (timm backbones) and
:class:`~lightning_ext.vision.mlp_classifier.MLPClassifier`."""
