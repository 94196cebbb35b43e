"""Automation: pipelines of fmforge verbs with cached steps, conditions and gates (``spec``, ``runner``,
``state``, ``backends``), the model registry (``registry``), lineage (``lineage``), the DAG picture (``dag``),
the MLflow hook and the whole lifecycle as one example (``lifecycle``). See docs/pipelines.md."""
