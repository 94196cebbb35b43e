"""Prompting: templates as data rendered in a sandbox, deterministic few-shot selection, measured template
comparisons (``prompt eval``), prompt-injection defences and their attack test (``prompt injection-test``),
and the sentence embeddings both nearest-shot selection and retrieval (``fmforge.rag``) use."""
