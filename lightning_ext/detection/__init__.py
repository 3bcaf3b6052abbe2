"""Object detection: a DETR detector with a D-FINE head (FDR + GO-LSD) or an L1+GIoU head, and an offline
digit-canvas detection task (needs the ``[detection]`` extra for mAP)."""
