"""Verbs of one stage: ``pipeline``, ``registry``: pipelines with cached steps, the model registry, lineage (the table ``cli.py`` parses with)."""

from __future__ import annotations

from fmforge.cli_args import JSON_OUT, Verb, arg, parent

REGISTRY = parent(arg("--registry", metavar="FILE",
                      help="the registry's SQLite file (default: $FMFORGE_REGISTRY or ~/.fmforge/registry.sqlite)"))

GROUPS: dict[str, tuple[str, str | None, str]] = {
    "pipeline": ("pipelines of fmforge verbs: cached steps, conditions, resume, Slurm, lineage, the DAG",
                 "Run a pipeline file (steps that call fmforge verbs, conditions, register, fail), see its DAG "
                 "and walk the lineage of what it produced. See docs/pipelines.md.", "ACTION"),
    "registry": ("the model registry: groups, numbered versions, metrics, approval, aliases, lineage",
                 "Model groups with numbered versions, metrics, approval status (PendingManualApproval, Approved, "
                 "Rejected) and aliases (NAME@champion), in one SQLite file.", "ACTION"),
}
VERBS: tuple[Verb, ...] = (
    Verb(
        "pipeline run", "fmforge.pipeline.command:run_command",
        help="validate and run a pipeline file; steps whose inputs did not change are reused",
        description="Validate the whole PIPELINE.yaml (verbs and their arguments against each verb's own options, "
                    "references, cycles, types), then run it: independent steps in parallel, each in "
                    "OUT/steps/NAME with its log; a step whose key (verb, resolved arguments, content hashes of "
                    "its inputs, fmforge version) matches an earlier success with intact outputs is reused. Rerun "
                    "after a failure or a kill: only unfinished steps and their dependants run again, training "
                    "steps resume from their checkpoints. On a terminal a live table shows each step's state "
                    "and time; elsewhere one line per state change. Exit 1 when a step failed; exit 2, nothing "
                    "recorded for the step, when a reference names a value a step's output lacks.",
        parents=(JSON_OUT, REGISTRY),
        args=(arg("pipeline", metavar="PIPELINE.yaml"),
              arg("--param", action="append", metavar="KEY=VALUE", help="set a pipeline parameter (repeatable)"),
              arg("--out", metavar="DIR", help="state and step directories (default: runs/pipeline-NAME)"),
              arg("--workers", type=int, default=2, metavar="N", help="steps at once (default: 2)"),
              arg("--no-cache", action="store_true", help="run every step, reusing nothing"),
              arg("--backend", choices=("local", "slurm"), default="local",
                  help="local processes (default), or one Slurm job per step chained with --dependency=afterok"),
              arg("--slurm-option", action="append", metavar="KEY=VALUE",
                  help="an `fmforge launch slurm` option for the step jobs: partition, account, qos, time, "
                       "cpus_per_task, mem, python, setup, sbatch_args, job_name, env (repeatable)"),
              arg("--mlflow", metavar="URI",
                  help="log train/eval steps and registered versions to this MLflow tracking URI "
                       "(pip install 'fmforge[mlflow]')")),
    ),
    Verb(
        "pipeline show", "fmforge.pipeline.dag:show_command",
        help="the last run's steps with state and timing, and its DAG as a PNG/SVG picture",
        parents=(JSON_OUT,),
        args=(arg("out", metavar="OUT", help="the --out of `fmforge pipeline run`"),
              arg("--picture", metavar="FILE.png|FILE.svg", help="where to draw the DAG (default: OUT/dag.png)")),
    ),
    Verb(
        "pipeline lineage", "fmforge.pipeline.lineage:lineage_command",
        help="what an artifact or registered model was derived from (--up) or what was derived from it (--down)",
        parents=(JSON_OUT, REGISTRY),
        args=(arg("target", metavar="PATH|NAME@VERSION"),
              arg("--up", action="store_true", help="its inputs, back to the external ones (default)"),
              arg("--down", action="store_true", help="what was derived from it"),
              arg("--run", metavar="OUT", help="the pipeline's --out, when PATH lies outside it")),
    ),
    Verb(
        "registry register", "fmforge.pipeline.registry:register_command",
        help="add a run directory as the next version of a model group (status PendingManualApproval)",
        parents=(JSON_OUT, REGISTRY),
        args=(arg("run_dir", metavar="RUN_DIR"),
              arg("--group", required=True, metavar="NAME"),
              arg("--metrics", metavar="FILE.json", help="metrics to store with the version (e.g. eval's JSON)"),
              arg("--description", default="", metavar="TEXT"),
              arg("--copy", action="store_true",
                  help="store a copy of the model files (not checkpoints) beside the registry, so that rewriting "
                       "RUN_DIR later cannot change this version")),
    ),
    Verb("registry list", "fmforge.pipeline.registry:list_command", help="model groups and their versions",
         parents=(JSON_OUT, REGISTRY), args=(arg("group", nargs="?", metavar="NAME"),)),
    Verb("registry show", "fmforge.pipeline.registry:show_command",
         help="one version: status, aliases, metrics, lineage", parents=(JSON_OUT, REGISTRY),
         args=(arg("ref", metavar="NAME@VERSION|NAME@ALIAS"),)),
    Verb("registry approve", "fmforge.pipeline.registry:approve_command", help="mark a version Approved",
         parents=(REGISTRY,),
         args=(arg("ref", metavar="NAME@VERSION"),
               arg("--force", action="store_true", help="approve a version that was rejected"))),
    Verb("registry reject", "fmforge.pipeline.registry:reject_command", help="mark a version Rejected",
         parents=(REGISTRY,), args=(arg("ref", metavar="NAME@VERSION"),)),
    Verb("registry alias", "fmforge.pipeline.registry:alias_command",
         help="point an alias (e.g. champion) at a version", parents=(REGISTRY,),
         args=(arg("ref", metavar="NAME@VERSION"), arg("alias", metavar="ALIAS"))),
    Verb("registry path", "fmforge.pipeline.registry:path_command",
         help="print the run directory of NAME@VERSION or NAME@ALIAS", parents=(REGISTRY,),
         args=(arg("ref", metavar="NAME@VERSION|NAME@ALIAS"),)),
)
