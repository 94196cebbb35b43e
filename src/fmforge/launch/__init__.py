"""Launch training on clusters: Slurm, Kubernetes (Kubeflow PyTorchJob), Amazon SageMaker, SkyPilot.

Each target turns one job spec into the artifact its scheduler takes (``launch.cli.launch`` is the verb);
all of them run the same ``torchrun ... -m fmforge train CONFIG --resume auto`` (``common.torchrun_argv``).
"""

from fmforge.launch.cli import launch, target_options

__all__ = ["launch", "target_options"]
