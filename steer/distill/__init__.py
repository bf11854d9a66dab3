"""EnchTable stage 1: distill a weight safety vector sigma = theta_aligned - theta_surrogate.

Modules: ``options`` (CLI flags, light: no torch), ``linearize`` (trainable targets per mode,
NTK-linearized blocks), ``answers`` (training prompts, refusal-ablated answer generation, cache),
``train`` (answer-only SFT, resumable), ``export`` (sigma, low-rank factors), ``run`` (end to end:
``DistillConfig``, ``run_distill``).
"""
