"""diffusers in and out: import a diffusers UNet2DModel as a raypd teacher, export a student as a DDIMPipeline.

``raypd.hf.teacher`` reads a diffusers model (local directory or hub id) and writes a normal raypd
checkpoint; ``raypd.hf.export`` writes a distilled student as a diffusers pipeline directory whose
scheduler reproduces raypd's N-step DDIM sampler. Both need the ``hf`` extra
(``pip install 'raypd[hf]'``); the network adapter itself is :mod:`raypd.models.hf`.
"""
