"""Multi-process start-up: a thin, loud wrapper over `jax.distributed.initialize`.

Modes: "off" (single process), "on" (always initialise: explicit coordinator settings from
the config, or JAX's own auto-detection on Cloud TPU and SLURM), "auto" (initialise only
when the environment says this is a multi-process job: SLURM with several tasks, a TPU pod
slice, or JAX_COORDINATOR_ADDRESS set, or when the config names a coordinator).
On CPU the cross-process collectives need gloo, which is switched on here.
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

log = logging.getLogger(__name__)


def _cluster_detected() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize(cfg: ml_collections.ConfigDict) -> bool:
    """Initialise jax.distributed per `config.distributed`; returns True if multi-process."""
    explicit = bool(cfg.coordinator_address)
    if cfg.mode == "off" or (cfg.mode == "auto" and not explicit and not _cluster_detected()):
        return False
    kwargs = {}
    if explicit:
        if cfg.num_processes < 1 or cfg.process_id < 0:
            raise ValueError("config.distributed: coordinator_address is set, so num_processes "
                             "(>= 1) and process_id (>= 0) must be set too")
        if cfg.process_id >= cfg.num_processes:
            raise ValueError(f"config.distributed.process_id {cfg.process_id} must be < "
                             f"num_processes {cfg.num_processes}")
        kwargs.update(coordinator_address=cfg.coordinator_address,
                      num_processes=cfg.num_processes, process_id=cfg.process_id)
    if cfg.local_device_ids:
        kwargs["local_device_ids"] = list(cfg.local_device_ids)
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(initialization_timeout=int(cfg.initialization_timeout_s),
                                   **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the settings that matter
        where = cfg.coordinator_address or "auto-detected coordinator"
        raise RuntimeError(
            f"jax.distributed.initialize failed ({where}, process "
            f"{cfg.process_id if explicit else '?'} of "
            f"{cfg.num_processes if explicit else '?'}, timeout "
            f"{cfg.initialization_timeout_s}s): {str(e).splitlines()[0]}") from e
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return jax.process_count() > 1


def _cpu_only() -> bool:
    # Must not touch the backend before initialize(); only look at configuration.
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return platforms.strip().startswith("cpu")
