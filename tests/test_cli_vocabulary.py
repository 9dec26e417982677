"""One CLI vocabulary (issue 19): the shared arguments of every dpkit-* command, one name for K, old flags kept.

Outside scripts rely on the older spellings, so each one is checked to land where its new name does.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from dpkit.errors import DpkitError

ROOT = Path(__file__).resolve().parents[1]


def _parsers():
    from dpkit.benchmarks import latency
    from dpkit.convert import cli as convert_cli
    from dpkit.eval import evaluate
    from dpkit.export import cli as export_cli
    from dpkit.train import cli as train_cli

    return {
        "dpkit-train": (train_cli.build_parser(), ["--config", "tiny"]),
        "dpkit-distill": (train_cli.build_distill_parser(), ["runs/teacher", "--out", "runs/student"]),
        "dpkit-export": (export_cli.parser(), ["runs/x", "--out", "b"]),
        "dpkit-eval": (evaluate._parser(), ["--random"]),
        "dpkit-bench": (latency.build_parser(), ["--quick"]),
        "dpkit-convert": (convert_cli.parser(), ["src", "--out", "o"]),
    }


def test_every_command_is_checked():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(_parsers())


@pytest.mark.parametrize("name", ["dpkit-train", "dpkit-distill", "dpkit-export", "dpkit-eval", "dpkit-bench",
                                  "dpkit-convert"])
def test_shared_arguments(name, tmp_path):
    parser, required = _parsers()[name]
    out = str(tmp_path / "r.json")
    args = parser.parse_args([*required, "--threads", "2", "--no-progress", "--json", out])
    assert (args.threads, args.no_progress, args.json) == (2, True, out)
    defaults = parser.parse_args(required)
    assert (defaults.threads, defaults.no_progress, defaults.json) == (0, False, None)
    assert "--version" in parser.format_help()


def test_eval_names_k_once_and_keeps_steps():
    from dpkit.eval.evaluate import _parser, _validate

    def parsed(*argv):
        a = _parser().parse_args(["--random", *argv])
        from dpkit.cli_args import resolve_sampler_args
        return resolve_sampler_args(a)

    assert parsed("--sampler", "ddim", "--num-steps", "10") == ("ddim", 10)
    assert parsed("--sampler", "ddim", "--steps", "10") == ("ddim", 10)  # the older name
    assert parsed("--sampler", "ddim-10") == ("ddim", 10)  # the label dpkit-bench and train.eval_samplers use
    assert parsed("--sampler", "ddpm:100") == ("ddpm", 100)
    assert parsed("--sampler", "ddim-10", "--num-steps", "10") == ("ddim", 10)
    assert parsed() == (None, None)
    for bad, message in ((["--sampler", "ddim-10", "--num-steps", "5"], "K = 10"),
                         (["--sampler", "euler"], "unknown --sampler"),
                         (["--sampler", "euler-10"], "SAMPLER-K"),
                         (["--num-steps", "0"], "--num-steps must be >= 1")):
        with pytest.raises(DpkitError, match=message):
            parsed(*bad)
    # _validate hands K on as `steps` (the name evaluate_policy takes) and refuses it with --random.
    a = _parser().parse_args(["--random", "--steps", "3"])
    with pytest.raises(DpkitError, match="--random takes no"):
        _validate(a)


def test_train_steps_and_bench_samplers_keep_their_old_names():
    parsers = _parsers()
    train, required = parsers["dpkit-train"]
    assert train.parse_args([*required, "--train-steps", "7"]).steps == 7
    assert train.parse_args([*required, "--steps", "7"]).steps == 7
    bench, _ = parsers["dpkit-bench"]
    assert bench.parse_args(["--samplers", "ddim-10"]).samplers == ["ddim-10"]
    assert bench.parse_args(["--steps", "ddim-10"]).samplers == ["ddim-10"]


def test_help_says_what_each_steps_means():
    parsers = _parsers()
    assert "optimizer steps" in parsers["dpkit-train"][0].format_help()
    eval_help = " ".join(parsers["dpkit-eval"][0].format_help().split())
    assert "denoising steps K" in eval_help and "environment steps" in eval_help
    assert "denoising steps K" in " ".join(parsers["dpkit-bench"][0].format_help().split())
