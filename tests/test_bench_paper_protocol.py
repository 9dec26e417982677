"""The paper-protocol benchmark: two seeds trained in parallel by the script, timed, and reported."""

from __future__ import annotations

import json

import pytest

from dpkit.benchmarks import bench_paper_protocol as bench
from synthetic import SMALL_TRAIN


def _run(argv):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    return e.value.code


def test_two_seeds_train_report_and_resume(train_store, tmp_path):
    overrides = {k: v for k, v in (o.split("=", 1) for o in SMALL_TRAIN)}
    overrides.update({"train.steps": "4", "train.eval_every": "2", "train.eval_episodes": "1",
                      "train.eval_max_steps": "8", "train.eval_samplers": "[ddim-2, ddpm-3]", "train.eval_last": "2",
                      "data.path": str(train_store), "policy.ddim_steps": "2"})
    sections: dict[str, dict[str, str]] = {}
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = value
    config = tmp_path / "cfg.yaml"
    config.write_text("".join(f"{s}:\n" + "".join(f"  {k}: {v}\n" for k, v in kv.items()) for s, kv in sections.items()))
    runs, out = tmp_path / "runs", tmp_path / "results"
    argv = ["--config", str(config), "--seeds", "3", "5", "--parallel", "2", "--runs-dir", str(runs),
            "--out-dir", str(out), "--name", "p", "--no-progress", "train.val_every=1"]
    assert _run(argv) == 0
    result = json.loads((out / "p.json").read_text())
    assert result["overrides"] == ["train.val_every=1"]  # every run trained with it, and the label says so
    assert [s["seed"] for s in result["seeds"]] == [3, 5]
    for s in result["seeds"]:
        timing = json.loads((runs / f"seed{s['seed']}" / "timing.json").read_text())
        assert timing["exit_code"] == 0 and timing["cpu_s"] > 0 and s["cpu_s"] == timing["cpu_s"]
        assert [e["step"] for e in s["evaluations"]] == [2, 4]
    ddpm = result["samplers"]["ddpm-3"]
    per_seed_max = [s["protocol"]["samplers"]["ddpm-3"]["max"] for s in result["seeds"]]
    assert ddpm["max"] == pytest.approx(sum(per_seed_max) / 2) and ddpm["max_range"] == [min(per_seed_max), max(per_seed_max)]
    assert [c["step"] for c in ddpm["curve"]] == [2, 4] and all(c["n"] == 2 for c in ddpm["curve"])
    md = (out / "p.md").read_text()
    assert "| Diffusion Policy-C, low-dim (paper) | ddpm-100 | 0.95 | 0.91 |" in md and "| ddim-2 |" in md
    assert (out / "p.png").read_bytes()[:4] == b"\x89PNG"
    mtime = (runs / "seed3" / "train_summary.json").stat().st_mtime_ns
    assert _run(argv) == 0  # finished runs are not trained again
    assert (runs / "seed3" / "train_summary.json").stat().st_mtime_ns == mtime
    for seed in (3, 5):
        first = json.loads((runs / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()[0])
        assert first["step"] == 1 and "val_loss" in first  # val_every=1 (the config: 3) reached dpkit-train
    # an earlier result beside this one: its rows first, then this run's
    assert _run(["--config", str(config), "--seeds", "3", "5", "--runs-dir", str(runs), "--out-dir", str(out),
                 "--name", "q", "--report-only", "--baseline", str(out / "p.json")]) == 0
    rows = [line for line in (out / "q.md").read_text().splitlines() if line.startswith("| dpkit")]
    assert len(rows) == 4 and "train.val_every=1" in rows[0] and "train.val_every=1" not in rows[2]


@pytest.mark.parametrize("argv,message", [
    (["--config", "tiny", "--report-only"], "train.eval_every=0"),
    (["--report-only", "--runs-dir", "nowhere"], "no finished run with rollout evaluations"),
    (["--seeds", "1", "1", "--report-only"], "--seeds distinct"),
    (["--config", "no_such_config", "--report-only"], "config 'no_such_config' not found"),
    (["--report-only", "train.no_such_field=1"], "no_such_field"),
    (["--report-only", "--baseline", "nowhere.json"], "--baseline nowhere.json: not a result of this script"),
])
def test_refusals(tmp_path, capsys, argv, message):
    assert _run([*argv, "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written
