"""Input/output below every stage: ``fs.py``, the fsspec wrapper for object storage."""
