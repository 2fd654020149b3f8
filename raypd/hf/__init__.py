"""diffusers in and out: import a diffusers UNet2DModel as a raypd teacher, export any student as a pipeline.

``raypd.hf.teacher`` reads a diffusers model (local directory or hub id) and writes a normal raypd
checkpoint; ``raypd.hf.export`` writes a distilled student as a diffusers pipeline directory that
samples exactly as raypd's N-step DDIM sampler does. The networks themselves are
:mod:`raypd.models.unet` (raypd's own) and :mod:`raypd.models.imported` (an imported model's).
"""
