"""fmforge: the foundation-model lifecycle — plan, prepare data, pretrain, scale out, fine-tune, evaluate, serve."""

__version__ = "0.1.0"
