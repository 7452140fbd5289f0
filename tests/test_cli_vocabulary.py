"""One config style and one CLI vocabulary (issue 21 items 3 and 9): every command resolves
its typed config through mvdiff.config (defaults <- --config <- --set <- quoted flags ->
validate_config), spells --output / --steps / --resume [latest|PATH] / --quiet the same way,
and keeps the old spellings as hidden aliases."""

from __future__ import annotations

import argparse

import pytest

from mvdiff.cli import build_parser
from mvdiff.config import ConfigError, apply_overrides, quote_value, validate_config
from mvdiff.errors import UserError

CONFIG_COMMANDS = ("dreambooth", "eval", "image-to-3d", "quickstart", "render", "sample",
                   "text-to-3d", "train")  # fmt: skip


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in p._actions for o in a.option_strings}


def test_every_config_command_shares_the_config_arguments_and_the_vocabulary():
    parsers = subparsers()
    for name in CONFIG_COMMANDS:
        opts = options(parsers[name])
        assert opts["--config"].dest == "config", name
        assert opts["--set"].dest == "overrides" and opts["--set"].default == [], name
        assert "--output" in opts and "--quiet" in opts, name
    for name in ("train", "dreambooth", "text-to-3d", "image-to-3d"):
        resume = options(parsers[name])["--resume"]
        assert resume.nargs == "?" and resume.const == "latest", name
    for name in ("train", "dreambooth", "text-to-3d", "sample"):
        assert "--steps" in options(parsers[name]), name
    assert "--output" in options(parsers["convert"])


@pytest.mark.parametrize(
    "command, old, new",
    [
        ("train", "--output-dir", "--output"),
        ("train", "--max-steps", "--steps"),
        ("dreambooth", "--output-dir", "--output"),
        ("dreambooth", "--max-steps", "--steps"),
    ],
)
def test_old_spellings_are_hidden_aliases_that_still_work(command, old, new, capsys):
    p = subparsers()[command]
    help_text = p.format_help()
    assert new in help_text and old not in help_text
    value = {"--output": ["runs/x"], "--steps": ["7"]}[new]
    a = p.parse_args([old, *value])
    b = p.parse_args([new, *value])
    dest = options(p)[new].dest
    assert getattr(a, dest) == getattr(b, dest) != options(p)[new].default
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["text-to-3d", "image-to-3d"])
def test_no_progress_still_works_and_is_hidden(command):
    """`--no-progress` (old) still turns the progress bar off, as before (it does not hide
    the info lines, which --quiet does); it is left out of --help."""
    p = subparsers()[command]
    assert "--no-progress" not in p.format_help() and "--quiet" in p.format_help()
    base = ["photo.png"] if command == "image-to-3d" else []
    args = p.parse_args([*base, "--output", "o", "--no-progress"])
    assert args.no_progress and not args.quiet


def test_flag_values_are_literal_and_set_values_yaml_in_train_and_dreambooth():
    """A flag value containing ': ' (or '[', 'no', '1e3') is the string given, in train and
    dreambooth alike (train parsed --output-dir 'a: b' as a mapping); a --set value is YAML
    in both (a mapping for a string field is refused in both, quoted it works)."""
    from mvdiff.commands import dreambooth, train

    parsers = subparsers()
    for module, name in ((train, "train"), (dreambooth, "dreambooth")):
        p = parsers[name]
        for text in ("runs/a: b", "[x]", "no", "1e3"):
            cfg = module.config_from_args(p.parse_args(["--output", text]))
            assert cfg.output_dir == text, (name, text)
        with pytest.raises(UserError, match="output_dir"):
            module.config_from_args(p.parse_args(["--set", "output_dir=runs/a: b"]))
        cfg = module.config_from_args(p.parse_args(["--set", 'output_dir="runs/a: b"']))
        assert cfg.output_dir == "runs/a: b"
    db = dreambooth.config_from_args(parsers["dreambooth"].parse_args(["--prompt", "a: sks dog"]))
    assert db.dreambooth.prompt == "a: sks dog"


def test_resume_vocabulary():
    from mvdiff.commands import dreambooth, train

    parsers = subparsers()
    for module, name in ((train, "train"), (dreambooth, "dreambooth")):
        p = parsers[name]
        assert module.config_from_args(p.parse_args(["--resume"])).checkpoint.resume == "latest"
        cfg = module.config_from_args(p.parse_args(["--resume", "runs/x/checkpoints/step-1"]))
        assert cfg.checkpoint.resume == "runs/x/checkpoints/step-1"
    from mvdiff.commands.text_to_3d import resume_flag

    p = parsers["text-to-3d"]
    assert resume_flag(p.parse_args(["--output", "o"])) is False
    assert resume_flag(p.parse_args(["--output", "o", "--resume"])) is True
    assert resume_flag(p.parse_args(["--output", "o", "--resume", "o/checkpoint.pt"])) is True
    with pytest.raises(UserError, match="--resume"):
        resume_flag(p.parse_args(["--output", "o", "--resume", "elsewhere/checkpoint.pt"]))


def test_a_bad_flag_value_names_the_flag():
    from mvdiff.commands import train

    p = subparsers()["train"]
    with pytest.raises(UserError, match="^--steps: max_steps: must be >= 1"):
        train.config_from_args(p.parse_args(["--steps", "0"]))


def test_sample_resolves_through_load_config(tmp_path):
    """`sample` reads --config and --set like the others (between --settings and the flags),
    its choices are Literal types, and with --image only unset values take ImageDream's."""
    import typing

    from mvdiff.commands.sample import SampleSettings, resolve_settings
    from mvdiff.pipelines import SCHEDULERS

    hints = typing.get_type_hints(SampleSettings)
    assert typing.get_args(hints["scheduler"]) == tuple(SCHEDULERS)
    cfg = tmp_path / "s.yaml"
    cfg.write_text("steps: 5\nguidance: 3.0\nscheduler: dpm\n")
    p = subparsers()["sample"]
    base = ["--model", "m", "--prompt", "x", "--output", "o"]
    s = resolve_settings(p.parse_args([*base, "--config", str(cfg), "--set", "steps=6"]))
    assert (s.steps, s.guidance, s.scheduler) == (6, 3.0, "dpm")
    s = resolve_settings(p.parse_args([*base, "--config", str(cfg), "--steps", "9"]))
    assert s.steps == 9
    with pytest.raises(UserError, match="scheduler"):
        resolve_settings(p.parse_args([*base, "--set", "scheduler=plms"]))
    photo = tmp_path / "p.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(photo)
    s = resolve_settings(p.parse_args([*base, "--image", str(photo), "--config", str(cfg)]))
    assert s.guidance == 3.0 and s.elevation == 5.0  # the file's guidance, ImageDream's elevation


def test_validate_config_checks_configs_built_in_code():
    """The one validation hook: Literal choices, LIMITS and validate() also for a config built
    in code (which never went through the converter); nested sections are named."""
    from mvdiff.sds.background import BackgroundConfig
    from mvdiff.sds.config import TextTo3DConfig

    validate_config(TextTo3DConfig())
    with pytest.raises(ConfigError, match="^shading: 'glossy' is not one of"):
        validate_config(TextTo3DConfig(shading="glossy"))
    with pytest.raises(ConfigError, match="^background.mode"):
        validate_config(TextTo3DConfig(background=BackgroundConfig(mode="sky")))
    with pytest.raises(ConfigError, match="albedo only"):  # TextTo3DConfig.validate
        validate_config(TextTo3DConfig(representation="gaussians", shading="lambertian"))


@pytest.mark.parametrize("value", ["a: b", "[x]", "no", "1e3", "", "null", "{k: v}", 'say "hi"'])
def test_quoted_flag_values_read_back_exactly(value):
    from mvdiff.training.config import TrainConfig

    cfg = apply_overrides(TrainConfig(), [f"output_dir={quote_value(value)}"])
    assert cfg.output_dir == value
