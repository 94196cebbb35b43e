"""Hugging Face interoperability: ``fmforge import hf`` / ``fmforge export hf`` (``convert.py``) over one
weight-and-config mapping per family (``decoder.py``: Llama, Mistral, Qwen2, GPT-2; ``encoders.py``: BERT,
ViT, CLIP)."""
