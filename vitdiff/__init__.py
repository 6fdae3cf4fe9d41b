"""vitdiff: a research workbook for vision-Transformer diffusion backbones.

Data flows one way: dataset -> batch -> diffusion loss(model) -> trainer;
sampler(model, noise) -> images -> metrics / figures.
"""
__version__ = "0.1.0"
