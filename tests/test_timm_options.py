"""timm train.py's flag spellings: each alias gives the config our own spelling gives; a timm flag whose
meaning differs from ours is refused with one line that says the difference."""
from __future__ import annotations

import pytest

from timm_local.cli import UsageError
from timm_local.cli import parse_config

ALIASES = {
    "img_size": (["--img-size", "64"], ["--image-size", "64"]),
    "workers": (["-j", "3"], ["--workers", "3"]),
    "output": (["--output", "runs/x"], ["--output-dir", "runs/x"]),
    "amp_fp16": (["--amp"], ["--mixed-precision", "fp16"]),
    "amp_bf16": (["--amp", "--amp-dtype", "bfloat16"], ["--mixed-precision", "bf16"]),
    "log_wandb": (["--log-wandb"], ["--trackers", "wandb"]),
    "log_wandb_added": (["--trackers", "tensorboard", "--log-wandb"], ["--trackers", "tensorboard,wandb"]),
    "mean_std": (["--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.2", "0.25"],
                 ["--mean", "[0.5, 0.4, 0.3]", "--std", "[0.2, 0.2, 0.25]"]),
    "model_kwargs": (["--model-kwargs", "drop_rate=0.1", "act_layer=gelu"],
                     ["--model-kwargs", "{drop_rate: 0.1, act_layer: gelu}"]),
    "drop": (["--drop", "0.1", "--drop-path", "0.2"], ["--drop-rate", "0.1", "--drop-path-rate", "0.2"]),
    "no_aug": (["--no-aug"], ["--no-augment"]),
    "log_interval": (["--log-interval", "7"], ["--log-every", "7"]),
    "checkpoint_hist": (["--checkpoint-hist", "5"], ["--keep-checkpoints", "5"]),
    "auto_augment": (["--auto-augment", "rand-m9-mstd0.5"], ["--aa", "rand-m9-mstd0.5"]),
    "pipeline_cut": (["--pipeline-cut", "0", "3"], ["--pipeline-cut", "[0, 3]"]),
}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_every_timm_spelling_parses_to_our_config(name):
    timm_spelling, ours = ALIASES[name]
    assert parse_config(timm_spelling) == parse_config(ours)
    assert parse_config(timm_spelling) != parse_config([])  # the flag did something


def test_parsed_values_have_their_types():
    cfg = parse_config(["--mean", "0.5", "0.4", "0.3", "--model-kwargs", "drop_rate=0.1", "--img-size", "64"])
    assert cfg.mean == [0.5, 0.4, 0.3] and cfg.model_kwargs == {"drop_rate": 0.1}
    assert cfg.image_size == 64


@pytest.mark.parametrize("flags, says", [
    (["-b", "64"], "-b is timm's per-process batch; here --batch-size is the GLOBAL batch"),
    (["--validation-batch-size", "64"], "--eval-batch-size is the GLOBAL evaluation batch"),
    (["--amp", "--mixed-precision", "bf16"], "--amp means --mixed-precision fp16"),
    (["--amp-dtype", "bfloat16"], "--amp-dtype without --amp"),
    (["--model-kwargs", "drop_rate"], "'drop_rate' is not key=value"),
])
def test_different_meanings_are_refused_in_one_line(flags, says):
    with pytest.raises(UsageError, match=None) as caught:
        parse_config(flags)
    assert says in str(caught.value) and "\n" not in str(caught.value)
