"""TrainConfig: YAML + --set overrides, and one clear line for every mistake."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mfr.trainer.config import ConfigError, TrainConfig, load_config, parse_overrides


def test_demo_config_is_valid_and_overridable():
    cfg = load_config(None, ["head.sample_rate=0.25", "model.backbone=r18", "optim.name=adamw"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.head.sample_rate == 0.25 and cfg.model.backbone == "r18" and cfg.optim.name == "adamw"
    assert cfg.head.num_classes == 256  # from the demo file, untouched


def test_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "head: {num_classes: 1000, margins: [1.0, 0.0, 0.4]}\nmodel: {backbone: custom, layers: [3, 25, 88, 3]}\n"
    )
    cfg = load_config(path, ["run.steps=50", "eval.fprs=[0.1, 0.01]"])
    assert cfg.head.margins == (1.0, 0.0, 0.4)
    assert cfg.model.layers == [3, 25, 88, 3]
    assert cfg.run.steps == 50 and cfg.eval.fprs == [0.1, 0.01]


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "a.e=null"]) == {
        "a": {"b": 1, "c": "x", "e": None},
        "d": [1, 2],
    }


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["head.colour=red"], r"head\.colour: Extra inputs are not permitted"),
        (["nosuch.key=1"], r"nosuch: Extra inputs are not permitted"),
        (["run.steps=many"], r"run\.steps: .*integer.*got 'many'"),
        (["head.sample_rate=1.5"], r"head\.sample_rate: .*less than or equal to 1"),
        (["head.num_classes=0"], r"head\.num_classes: .*greater than or equal to 1"),
        (["head.margins=[1.0, -0.1, 0.0]"], r"head: margins m2 must be in \[0, pi/2\)"),
        (["model.backbone=r1000"], r"model\.backbone: Input should be 'tiny', 'r18'"),
        (["model.backbone=custom"], r"backbone 'custom' needs layers"),
        (["data.batch_size=10", "optim.micro_batches=3"], r"divisible by optim\.micro_batches"),
        (["optim.warmup_steps=500", "run.steps=100"], r"warmup_steps \(500\) must be < run\.steps \(100\)"),
        (["run.amp=fp16", "run.device=cpu"], r"fp16 needs a GPU"),
        (["eval.fprs=[0.1, 2]"], r"fprs must be in \(0, 1\)"),
        (["head=3"], r"head: .*valid dictionary"),
        (["head.num_classes.x=1"], r"head\.num_classes is a value, not a section"),
        (["novalue"], r"expected section\.key=value"),
    ],
)
def test_bad_input_is_one_clear_line(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)
    assert not str(info.value).startswith("config:"), "no doubled prefix for model-level errors"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("head: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"head: Field required"):
        load_config(empty)


def test_trainer_exits_2_on_bad_config_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "mfr.trainer", "--set", "head.margins=[1.0, -0.5, 0.0]"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mfr: config error: head: margins m2 must be in [0, pi/2) (additive angular margin), got -0.5"
    ]
