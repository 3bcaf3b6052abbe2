"""Speech and audio: offline noisy-speech data, FRCRN speech enhancement and its Lightning module.

Audio is read with ``soundfile`` (WAV, FLAC, OGG) and resampled with SciPy's polyphase filter, so the family needs
no torchaudio backend; ``pesq`` and ``pystoi`` back torchmetrics' PESQ and STOI. All three come with the
``[audio]`` extra: ``pip install "lightning-ext[audio]"``.
"""
