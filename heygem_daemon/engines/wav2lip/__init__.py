"""Wav2Lip-compatible lip-sync engine (torch core).

Importing this package does not import torch. The torch-backed modules are imported explicitly:

- ``heygem_daemon.engines.wav2lip.model``: the ``Wav2Lip`` generator network.
- ``heygem_daemon.engines.wav2lip.checkpoint``: ``load_checkpoint`` / ``save_checkpoint`` for the
  released ``wav2lip.pth`` / ``wav2lip_gan.pth`` format.
- ``heygem_daemon.engines.wav2lip.audio_features``: the 80-band mel spectrogram and per-frame chunks.
- ``heygem_daemon.engines.wav2lip.face_batch``: face crops to model input and model output to pixels.
- ``heygem_daemon.engines.wav2lip.runtime``: the model on one device (``Predictor``), OOM halving.
- ``heygem_daemon.engines.wav2lip.render``: one generation, pipelined (``stages``) into the MP4.

``engine`` (the ``Wav2LipEngine`` and its settings), ``boxes`` and ``stages`` do not import torch.
"""
