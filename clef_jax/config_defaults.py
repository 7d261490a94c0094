"""Default values of every config key; recipe files in `configs/` start from these.

Every key a run may set exists here, so a misspelt override on the command line fails with
ml_collections' error naming the key, and `validate` checks values before anything runs.
"""

from __future__ import annotations

import ml_collections

from clef_jax import host_memory
from clef_jax.data.config import LEAD_NAMES, default_data_config


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "clef"  # clef | simclr | byol | moco
    c.init_from = ""  # workdir or pretrained dir whose backbone weights start this run

    c.model = ml_collections.ConfigDict(dict(
        name="net1d", size="small", in_channels=1,
        compute_dtype="float32",  # bfloat16 on TPU/GPU; params stay float32
        remat="none",  # none | block | dots (msformer only): recompute activations in backward
    ))
    # The projection head (Linear-GELU-Linear) between backbone and loss, for every method.
    c.projection = ml_collections.ConfigDict(dict(
        # 0: the method's default (`methods.Method.default_projection`): none for clef and simclr
        # (the loss sees backbone embeddings, as the reference CLEF), 256 byol, 128 moco
        dim=0,
        hidden_dim=0,  # 0: the backbone's embedding width
    ))
    c.loss = ml_collections.ConfigDict(dict(temperature=0.07, use_missing_mask=False))
    c.byol = ml_collections.ConfigDict(dict(predictor_hidden_dim=1024, ema_decay=0.996))
    # variant: "symmetric" (ours: both views query, keys enqueued once per step) or "reference"
    # (the authors' code: query view 1, key view 2, keys enqueued twice per step); methods.Moco.
    c.moco = ml_collections.ConfigDict(dict(queue_size=65536, momentum=0.999,
                                            variant="symmetric"))

    c.data = default_data_config()  # keys documented in clef_jax/data/config.py
    # Used when data.dataset_dir is not a finished dataset yet: prepare it with data_prep first
    # (clef_jax/data/prepare.py). Process 0 builds; the others wait up to wait_timeout_s
    # seconds for data_prep's completion marker.
    c.data.prepare = ml_collections.ConfigDict(dict(source="", input="", metadata="",
                                                    extra_args=(), wait_timeout_s=3600.0))

    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, weight_decay=5e-4, b1=0.9, b2=0.999, eps=1e-8,
        schedule="cosine_warm_restarts", t0_epochs=10.0, t_mult=2.0, eta_min=1e-6,
        interval="epoch",  # the reference steps the scheduler once per epoch
        warmup_steps=0, grad_clip_norm=0.0,
    ))
    c.train = ml_collections.ConfigDict(dict(
        global_batch_size=64, num_epochs=100, num_steps=0,  # num_steps > 0 overrides epochs
        seed=0, log_every_steps=10,
        # Persistent XLA compilation cache: "auto" = ${CLEF_JAX_CACHE:-~/.cache/clef_jax}/xla,
        # "" = off; JAX_COMPILATION_CACHE_DIR wins. Cuts the time to the first step.
        compilation_cache_dir="auto",
        # Several processes agree on SIGTERM by an all-gather about this often (seconds).
        preemption_check_s=2.0,
        # jax.transfer_guard level for the steps between logs: "log" names any device->host
        # read that would make the host wait for the device; "disallow" makes it an error.
        host_transfer_guard="log",
        # glibc malloc for XLA:CPU runs (clef_jax/host_memory.py): "keep" reuses freed blocks
        # instead of re-mapping a step's temporary buffer every step; "auto" does so on the
        # CPU backend with one device per process; "system" leaves glibc's defaults. Never
        # applied once JAX's backend runs in the process (a warning says so).
        host_malloc="auto",
    ))
    c.resume = ml_collections.ConfigDict(dict(
        # Resuming with another batch size, data seed, process count or dataset changes the
        # batches every later step sees; refused unless this is True (then recorded).
        allow_data_change=False,
    ))
    # Evaluations during pretraining (clef_jax/periodic_eval.py); every_steps=0 turns one off.
    c.evals = ml_collections.ConfigDict(dict(
        linear_probe=ml_collections.ConfigDict(dict(
            every_steps=0,
            dataset_dir="",  # "" = data.dataset_dir; any data_prep dataset with labels
            split="validation",  # scored split; the probe is fitted on "train"
            task="superdiagnostic",  # a clef_jax.evaluate task (PTB-XL aggregations, sex, ...)
            lead="I",
            min_count=0,  # "dx" task: minimum positives per class (0 = the task's default)
            random_baseline=True,  # a fresh run also probes its random encoder at step 0
        )),
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=500, keep=3, async_save=True,
        # An eval metric (e.g. "eval/linear_probe/macro_auroc"; lower is better for mae/loss):
        # the best backbone so far is kept in <checkpoint dir>_best/, besides the newest ones.
        keep_best="",
        # "" = <workdir>/checkpoints. A local path or gs:// (Orbax's TensorStore drivers); lets
        # a workdir on another scheme keep its checkpoints somewhere Orbax can write.
        directory=""))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1), axes=("data", "fsdp")))
    # Parameter sharding as data (clef_jax/sharding.py). param_rules: (regex over the parameter
    # path, per-dimension mesh axes) pairs, aligned to trailing dims; the FIRST match wins.
    # logical_rules: (logical axis, mesh axes or None) pairs for the Transformer's annotated
    # parameters. Mesh axes the mesh lacks are skipped; a dim they do not divide is replicated.
    from clef_jax import sharding

    c.sharding = ml_collections.ConfigDict(dict(
        param_rules=sharding.NET1D_RULES,
        logical_rules=tuple(sharding.LOGICAL_RULES.items()),
    ))
    c.distributed = ml_collections.ConfigDict(dict(
        mode="auto",  # auto | off | on
        coordinator_address="", num_processes=0, process_id=-1, local_device_ids=(),
        initialization_timeout_s=300,
        # A process silent this long counts as dead, and the others abort (JAX's default 100).
        heartbeat_timeout_s=100,
        shutdown_timeout_s=300,  # how long exit waits for the other processes
    ))
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Check values (types are enforced by ml_collections); errors name the key."""
    from clef_jax.methods import METHOD_NAMES
    from clef_jax.models import BACKBONE_NAMES

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ValueError(f"config.{key}: {message}")

    require(c.method in METHOD_NAMES, "method",
            f"unknown method {c.method!r}; valid: {', '.join(METHOD_NAMES)}")
    require(c.model.name in BACKBONE_NAMES, "model.name",
            f"unknown model {c.model.name!r}; valid: {', '.join(BACKBONE_NAMES)}")
    require(c.model.size in ("small", "medium", "large"), "model.size",
            f"unknown size {c.model.size!r}; valid: small, medium, large")
    require(c.model.in_channels >= 1, "model.in_channels", "must be >= 1")
    require(c.model.compute_dtype in ("float32", "bfloat16", "float16"), "model.compute_dtype",
            f"{c.model.compute_dtype!r} is not one of float32, bfloat16, float16")
    require(c.model.remat in ("none", "block", "dots"), "model.remat",
            f"{c.model.remat!r} is not one of none, block, dots")
    require(c.model.remat != "dots" or c.model.name == "msformer", "model.remat",
            f"{c.model.name} supports remat none or block, not 'dots'")
    from clef_jax.sharding import rule_problems

    for key, message in rule_problems(c.sharding.param_rules, c.sharding.logical_rules):
        require(False, f"sharding.{key}", message)
    require(c.train.global_batch_size >= 1, "train.global_batch_size", "must be >= 1")
    require(c.train.num_steps > 0 or c.train.num_epochs > 0, "train.num_epochs",
            "set train.num_epochs or train.num_steps to a positive number")
    require(c.train.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
    require(c.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    require(c.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    require(c.train.host_transfer_guard in ("allow", "log", "disallow"),
            "train.host_transfer_guard",
            f"{c.train.host_transfer_guard!r} is not one of allow, log, disallow")
    require(c.train.host_malloc in host_memory.MODES, "train.host_malloc",
            f"{c.train.host_malloc!r} is not one of {', '.join(host_memory.MODES)}")
    require(c.train.preemption_check_s > 0, "train.preemption_check_s", "must be positive")
    probe = c.evals.linear_probe
    require(probe.every_steps >= 0, "evals.linear_probe.every_steps", "must be >= 0 (0 = off)")
    require(probe.split in ("validation", "test"), "evals.linear_probe.split",
            f"{probe.split!r} is not one of validation, test (the probe is fitted on train)")
    require(probe.lead in LEAD_NAMES, "evals.linear_probe.lead",
            f"unknown lead {probe.lead!r}; valid: {', '.join(LEAD_NAMES)}")
    if c.checkpoint.keep_best:
        require(c.checkpoint.keep_best.startswith("eval/linear_probe/")
                and probe.every_steps > 0, "checkpoint.keep_best",
                f"{c.checkpoint.keep_best!r}: name a metric of an enabled evaluation, e.g. "
                "eval/linear_probe/macro_auroc with evals.linear_probe.every_steps > 0")
    require(c.loss.temperature > 0, "loss.temperature", "must be positive")
    require(c.projection.dim >= 0, "projection.dim", "must be >= 0 (0: the method's default)")
    require(c.projection.hidden_dim >= 0, "projection.hidden_dim",
            "must be >= 0 (0: the backbone's embedding width)")
    require(0.0 <= c.data.same_lead_prob <= 1.0, "data.same_lead_prob", "must be in [0, 1]")
    require(bool(c.data.dataset_dir), "data.dataset_dir",
            "is empty; point it at a directory written by `python -m data_prep build`")
    unknown = [lead for lead in c.data.leads if lead not in LEAD_NAMES]
    require(not unknown and len(c.data.leads) > 0, "data.leads",
            f"unknown lead(s) {unknown}; valid: {', '.join(LEAD_NAMES)}")
    require(c.data.prepare.wait_timeout_s > 0, "data.prepare.wait_timeout_s",
            "must be > 0 (seconds the other processes wait for process 0's data_prep build)")
    require(c.distributed.mode in ("auto", "on", "off"), "distributed.mode",
            f"{c.distributed.mode!r} is not one of auto, on, off")
    require(c.distributed.initialization_timeout_s >= 1, "distributed.initialization_timeout_s",
            "must be >= 1 (seconds to wait for every process to join)")
    for key in ("heartbeat_timeout_s", "shutdown_timeout_s"):
        require(c.distributed[key] >= 1, f"distributed.{key}", "must be >= 1 (seconds)")
    if c.method == "byol":
        require(c.byol.predictor_hidden_dim >= 1, "byol.predictor_hidden_dim", "must be >= 1")
    if c.method == "moco":
        from clef_jax.methods import MOCO_VARIANTS

        require(c.moco.variant in MOCO_VARIANTS, "moco.variant",
                f"{c.moco.variant!r} is not one of {', '.join(MOCO_VARIANTS)}")
        # Keys go into the queue in whole batches (twice per step for "reference"), at a
        # pointer that wraps to 0: whole batches must tile the queue exactly.
        require(c.moco.queue_size % c.train.global_batch_size == 0, "moco.queue_size",
                f"{c.moco.queue_size} must be a multiple of train.global_batch_size "
                f"({c.train.global_batch_size})")
