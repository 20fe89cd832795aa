"""Config keys of the timm plug-in, added to a detectron2 ``CfgNode`` in the plug-in style.

detectron2's yacs configs refuse unknown keys, so every project that brings its own modules
ships an ``add_*_config(cfg)`` (see ``detectron2/projects/*/config.py``) that is called on
``get_cfg()`` before ``merge_from_file``. This is ours.
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_timm_config(cfg: CN) -> CN:
    """Add the ``MODEL.TIMM`` keys and the solver keys this plug-in understands, in place.

    ``MODEL.TIMM``:
        NAME: timm model name (``resnet34``). May be left empty when ``WEIGHTS`` points to an
            export whose ``config.json`` names the architecture.
        WEIGHTS: where the backbone's weights come from: a run directory containing
            ``export/``, an export folder (``model.safetensors`` + ``config.json``), a
            ``local-dir:`` folder, a ``.safetensors`` file or an ``hf-hub:`` id. Empty means
            random initialisation. This is *not* ``MODEL.WEIGHTS``, which stays the
            detectron2 checkpoint of the whole detector (for ``--eval-only``/fine-tuning).
        OUT_INDICES: indices into timm's ``feature_info`` to expose; ResNets: 1..4 give
            strides 4..32, named ``res2``..``res5`` like detectron2's own ResNet.
        NORM: ``FrozenBN`` (pretrained backbones, the detectron2 default), ``BN`` (timm's
            BatchNorm as is), ``SyncBN`` or ``GN`` (GroupNorm, 32 groups; use BN or GN when
            the backbone is randomly initialised, FrozenBN would freeze meaningless stats).
        FREEZE_AT: freeze everything up to and including the ``FREEZE_AT``-th entry of timm's
            ``feature_info`` (0: nothing; ResNets: 1 = stem, 2 = stem + res2, as detectron2).

    ``SOLVER`` (detectron2 has no key for these):
        OPTIMIZER: ``SGD`` (detectron2's own builder) or ``ADAMW`` (the paper's A.7).
        BETAS: AdamW betas.
        LOG_PERIOD: how often (iterations) metrics are written to ``metrics.json`` and the
            console; detectron2 hard-codes 20, short smoke runs want 1.
    """
    cfg.MODEL.TIMM = CN()
    cfg.MODEL.TIMM.NAME = "resnet34"
    cfg.MODEL.TIMM.WEIGHTS = ""
    cfg.MODEL.TIMM.OUT_INDICES = [1, 2, 3, 4]
    cfg.MODEL.TIMM.NORM = "FrozenBN"
    cfg.MODEL.TIMM.FREEZE_AT = 2

    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BETAS = (0.9, 0.999)
    cfg.SOLVER.LOG_PERIOD = 20
    return cfg


def get_timm_cfg() -> CN:
    """detectron2's default config with this plug-in's keys added (a convenience)."""
    from detectron2.config import get_cfg

    return add_timm_config(get_cfg())
