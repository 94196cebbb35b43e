"""Retrieval-augmented generation over fmforge's own encoders: an index of token chunks of documents
(``index.py``), dense, BM25 and hybrid search (``search.py``), grounded answers with citations (``ask.py``),
and the grounding the server applies to chat messages (``serving.py``)."""
