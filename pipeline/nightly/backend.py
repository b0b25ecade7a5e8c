"""Which form of the model a night runs (`models.backends.choose_backend`), given where it runs:
the device is looked up here, before the night starts, only as far as the choice needs it."""

from __future__ import annotations

from pipeline import logs
from pipeline.config import RecategorizeConfig
from pipeline.inference import engine
from pipeline.models.backends import BackendChoice, choose_backend


def night_device(cfg: RecategorizeConfig) -> str:
    """'cpu' or 'cuda': where the night's model will run. A cluster is asked for its GPUs only
    when --device auto leaves it open."""
    if cfg.device != "auto":
        return cfg.device
    if engine.on_cluster(cfg):
        from pipeline.inference.cluster import cluster_device, init_ray

        init_ray(cfg.ray_address, cfg.num_cpus)
        return cluster_device("auto")
    from pipeline.inference.device import local_device

    return local_device("auto")


def night_backend(cfg: RecategorizeConfig) -> BackendChoice:
    """The backend the night runs (--backend, else the default for its device); a default that
    could not be followed is said once on stderr."""
    torch_only = [option for option, given in (("--precision", cfg.precision != "auto"),
                                               ("--compile", cfg.compile)) if given]
    choice = choose_backend(cfg.model, cfg.backend, night_device(cfg), torch_only)
    if choice.warning:
        logs.warning(choice.warning)
    return choice
