"""Speech and audio: offline noisy-speech data, FRCRN speech enhancement and its Lightning module; speaker data with
speaker-disjoint trials (Debian voice packs, espeak-ng voices, pseudo-speakers), the EfficientTDNN supernet with
its SubnetSampling and BNRecalibration callbacks, its MACs-budget search and speaker verification (EER, minDCF).

Audio is read with ``soundfile`` (WAV, FLAC, OGG) and resampled with SciPy's polyphase filter, so the family needs
no torchaudio backend; ``pesq`` and ``pystoi`` back torchmetrics' PESQ and STOI. All three come with the
``[audio]`` extra: ``pip install "lightning-ext[audio]"``.
"""
