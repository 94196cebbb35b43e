"""Bias: SageMaker Clarify-style metrics on labelled tables (``clarify``, ``tables``, ``data_command``), LM bias
suites, and the gates/drift every bias result shares (``gates``)."""
