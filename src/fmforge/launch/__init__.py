"""Launch work on clusters: training (Slurm, Kubernetes (Kubeflow PyTorchJob), Amazon SageMaker, SkyPilot; the
verb is ``launch.cli.launch``, every target runs the same ``torchrun ... -m fmforge train CONFIG --resume
auto``, ``common.torchrun_argv``) and sharded data preparation (``data_prepare``: units on local processes,
Ray or a Slurm array job, ``data_slurm``). Importing the package imports nothing else, so a Slurm data job
does not pay for torch."""
