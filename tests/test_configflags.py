"""Flags declared on config dataclass fields (runtime/core/fields.py declares, runtime/cli/flags.py parses): types,
help with the dataclass's default, only the values the user gave, and the real verbs built from them."""

import argparse
import enum
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgepix.cli import build_parser, join_compound_verb
from edgepix.runtime.cli.flags import add_config_flags, config_values
from edgepix.runtime.core.fields import flag
from edgepix.runtime.streams.jobs import StreamJob
from edgepix.runtime.streams.sources import SourceOptions
from edgepix.train.config import DEFAULTS, GanKind, GanTrainConfig, SegTrainConfig


class Colour(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Example:
    count: int = field(default=3, metadata=flag("how many"))
    rate: float = field(default=4e-3, metadata=flag("step size"))
    label: str = field(default="a", metadata=flag("a name"))
    fast: bool = field(default=True, metadata=flag("go fast"))
    colour: Colour = field(default=Colour.RED, metadata=flag())
    limit: int | None = field(default=None, metadata=flag("at most this many", default="unlimited"))
    side: str = field(default="left", metadata=flag("which side", choices=("left", "right")))
    out: str | None = field(default=None, metadata=flag("where", name="--to", metavar="FILE", type=Path))
    share: float = field(default=0.5, metadata=flag("share of the total in %"))
    hidden: int = 7  # no flag


def parser(**kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="example")
    add_config_flags(p, Example, **kwargs)
    return p


def option(p: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in p._actions if a.dest == dest)


def test_one_flag_per_declared_field_typed_by_its_annotation():
    p = parser()
    args = p.parse_args(["--count", "5", "--rate", "1e-3", "--label", "b", "--no-fast", "--colour", "blue",
                         "--limit", "9", "--side", "right", "--to", "x.json", "--share", "0.25"])
    assert config_values(args, Example) == {"count": 5, "rate": 1e-3, "label": "b", "fast": False,
                                            "colour": Colour.BLUE, "limit": 9, "side": "right",
                                            "out": Path("x.json"), "share": 0.25}
    values = config_values(args, Example)
    assert type(values["count"]) is int and type(values["rate"]) is float and values["colour"] is Colour.BLUE
    assert Example(**values).out == Path("x.json")
    assert not any(a.dest == "hidden" for a in p._actions)
    assert option(p, "out").option_strings == ["--to"] and option(p, "out").metavar == "FILE"
    assert option(p, "fast").option_strings == ["--fast", "--no-fast"]


def test_help_ends_with_the_dataclass_default_or_the_declared_account_of_it():
    p = parser()
    assert option(p, "rate").help == "step size (default: 0.004)"
    assert option(p, "fast").help == "go fast (default: on)"
    assert option(p, "colour").help == "default: red"
    assert option(p, "limit").help == "at most this many (default: unlimited)"
    assert option(p, "out").help == "where"  # None and nothing declared: no default to state
    text = p.format_help()  # argparse %-formats help: a literal % must survive
    assert "share of the total in % (default: 0.5)" in text and "{red,blue}" in text and "{left,right}" in text


def test_defaults_replace_the_dataclass_defaults_in_the_help_only():
    p = parser(defaults={"count": 8})
    assert option(p, "count").help == "how many (default: 8)"
    assert config_values(p.parse_args([]), Example) == {}


def test_only_the_flags_the_user_gave_are_returned():
    p = parser()
    assert config_values(p.parse_args([]), Example) == {}
    assert config_values(p.parse_args(["--no-fast"]), Example) == {"fast": False}
    assert config_values(p.parse_args(["--count", "0"]), Example) == {"count": 0}  # a falsy value is still given


def test_names_pick_and_order_the_flags():
    p = parser(names=["side", "count"])
    assert [a.dest for a in p._actions if a.dest != "help"] == ["side", "count"]
    assert config_values(p.parse_args(["--count", "2"]), Example) == {"count": 2}


@pytest.mark.parametrize("argv, message", [
    (["--colour", "bleu"], "argument --colour: invalid choice: 'bleu' (choose from 'red', 'blue')"),
    (["--side", "up"], "argument --side: invalid choice: 'up'"),
    (["--count", "x"], "argument --count: invalid int value: 'x'"),
])
def test_bad_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def verb(line: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser of a verb of the real CLI, and the flags parsed from `line`."""
    root = build_parser()
    argv = join_compound_verb(line.split(), root.get_default("_compound_verbs"))
    args = root.parse_args(argv)
    actions = root._subparsers._group_actions[0].choices
    sub = actions[argv[0]]
    if argv[0] == "train":
        sub = sub._subparsers._group_actions[0].choices[argv[1]]
    return sub, args


def test_train_verbs_state_the_config_defaults_per_kind():
    seg, args = verb("train seg --data synthetic --lr 1e-3 --no-amp --optimizer sgd")
    assert option(seg, "lr").help == "peak learning rate (default: 0.004)"
    assert config_values(args, SegTrainConfig) == {"lr": 1e-3, "amp": False, "optimizer": "sgd"}
    assert SegTrainConfig(**config_values(args, SegTrainConfig)).optimizer.value == "sgd"
    for kind, name in ((GanKind.DCGAN, "gan"), (GanKind.PIX2PIX, "pix2pix")):
        parser_, args = verb(f"train {name} --data synthetic")
        assert config_values(args, GanTrainConfig) == {}
        for key in ("imgsz", "batch", "epochs", "sample_n", "model"):
            assert option(parser_, key).help.endswith(f"default: {DEFAULTS[kind][key]})"), (name, key)
    assert option(verb("train pix2pix --data d")[0], "scenes").help.endswith("(default: lit)")
    assert option(verb("train gan --data d")[0], "scenes").help.endswith("(default: varied)")


def test_stream_flags_build_the_job_and_leave_the_rest_to_the_dataclasses():
    from edgepix.runtime.cli.segment import stream_job

    _, args = verb("segment m.onnx")
    job = stream_job(args, sources=["synthetic://"], sinks=["null://"])
    assert job.source_options == SourceOptions() and job.batch_timeout_ms == StreamJob.batch_timeout_ms
    sub, args = verb("segment m.onnx --batch-timeout 10 --input-fps 15 --input-codec mjpg --rtsp-transport tcp "
                     "--reconnect-attempts 0 --realtime --stats s.json --max-frames 5")
    job = stream_job(args, sources=["synthetic://"], sinks=["null://"])
    assert (job.batch_timeout_ms, job.stats, job.max_frames) == (10.0, Path("s.json"), 5)
    assert job.source_options == SourceOptions(fps=15.0, codec="MJPG", rtsp_transport="tcp", reconnect_attempts=0,
                                               realtime=True)
    assert option(sub, "batch_timeout_ms").help.endswith("(default: 40)")
    assert option(sub, "open_timeout").help.endswith("(default: 10)")
