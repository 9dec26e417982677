"""The thread rule (dpkit.threads) and where it reaches: the choice from an affinity mask and a model size,
the OpenMP wait policy set before torch loads, `--threads` on every CLI, the backends' `threads=`, and
the demo's under-training warning when a time limit stops training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpkit import demo
from dpkit.errors import DpkitError, InputError
from dpkit.threads import PARAMS_PER_THREAD, choose_threads, parse_threads, resolve_spin, usable_cpus
from synthetic import SMALL_TRAIN

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden" / "bundle"
TINY, LOWDIM, IMAGE = 4_200_000, 65_800_000, 263_000_000  # the configs' U-Net sizes


def _env(**kw: str) -> dict[str, str]:
    """The process environment without the variables that request threads (conftest sets OMP_NUM_THREADS)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DPKIT_THREADS", "OMP_WAIT_POLICY")}
    return {**env, **kw}


# --------------------------------------------------------------------------- the rule


def test_choice_from_affinity_mask_and_model_size(tmp_path):
    assert usable_cpus(affinity={0, 1, 2, 3}, cgroup_root=tmp_path) == 4
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a container allowed 1.5 CPUs' worth of time
    assert usable_cpus(affinity={0, 1, 2, 3}, cgroup_root=tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(affinity={5}, cgroup_root=tmp_path) == 1

    def pick(params, cpus):
        return choose_threads(None, params=params, cpus=cpus, env={}).threads

    assert [pick(TINY, c) for c in (1, 2, 16)] == [1, 1, 1]  # small models: one thread whatever the machine
    assert [pick(LOWDIM, c) for c in (1, 2, 16)] == [1, 2, LOWDIM // PARAMS_PER_THREAD]
    assert [pick(IMAGE, c) for c in (2, 8, 64)] == [2, 8, IMAGE // PARAMS_PER_THREAD]
    assert pick(None, 16) == 1  # unknown size
    c = choose_threads(None, params=LOWDIM, cpus=2, env={})
    assert c.source == "policy" and not c.spin and "65.8 M parameters" in c.reason
    j = c.to_json()
    assert j["wait_policy"] == "passive" and j["usable_cpus"] == 2 and j["threads"] == 2 and "load_avg" in j


def test_requests_win_in_order():
    env = {"DPKIT_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert choose_threads(7, params=TINY, cpus=2, env=env).threads == 7  # more than the CPUs: asked for
    assert choose_threads(0, params=TINY, cpus=2, env=env).source == "DPKIT_THREADS"
    assert choose_threads(None, params=TINY, cpus=2, env={"OMP_NUM_THREADS": "4,2"}).threads == 4
    assert choose_threads(None, params=IMAGE, cpus=8, env={"OMP_NUM_THREADS": ""}).source == "policy"
    assert choose_threads(None, cpus=2, env={}, spin=True).spin
    for bad in (-1, 1.5, True, "two", "", None.__class__):
        with pytest.raises(InputError, match="threads must be an integer"):
            parse_threads(bad)
    with pytest.raises(InputError, match=r"\$OMP_NUM_THREADS"):
        choose_threads(None, env={"OMP_NUM_THREADS": "lots"})
    assert resolve_spin(None, True) is True and resolve_spin(None, None) is None
    with pytest.raises(InputError, match="disagree"):
        resolve_spin(True, False)


def test_choice_follows_the_real_affinity_mask():
    """A process pinned to one CPU gets one thread even for the largest model."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
            "from dpkit.threads import choose_threads, usable_cpus\n"
            f"print(usable_cpus(), choose_threads(None, params={IMAGE}, env={{}}).threads)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.stdout.split() == ["1", "1"], out.stderr


def test_openmp_wait_policy_is_set_before_torch_loads():
    """libgomp reads OMP_WAIT_POLICY once, at `import torch`; its own report (OMP_DISPLAY_ENV) shows the
    effect: GOMP_SPINCOUNT 0 (passive) instead of 300000 (its default spin before sleeping)."""
    code = "import dpkit, torch; from dpkit.threads import openmp_state; print(openmp_state())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=_env(OMP_DISPLAY_ENV="VERBOSE"))
    assert "GOMP_SPINCOUNT = '0'" in run.stderr + run.stdout, run.stderr[-2000:]
    assert "'in_time': True" in run.stdout
    user = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_env(OMP_DISPLAY_ENV="VERBOSE", OMP_WAIT_POLICY="ACTIVE"))
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in user.stderr + user.stdout  # the user's own choice is kept


# --------------------------------------------------------------------------- --threads on every CLI


def _parsers():
    from dpkit.benchmarks import latency
    from dpkit.convert import cli as convert_cli
    from dpkit.eval import evaluate
    from dpkit.export import cli as export_cli
    from dpkit.train import cli as train_cli

    return {
        "dpkit-train": (train_cli.build_parser(), train_cli.main, ["--config", "tiny"]),
        "dpkit-export": (export_cli.parser(), export_cli.main, ["runs/x", "--out", "b"]),
        "dpkit-eval": (evaluate._parser(), evaluate.main, ["--random"]),
        "dpkit-bench": (latency.build_parser(), latency.main, ["--quick"]),
        "dpkit-convert": (convert_cli.parser(), convert_cli.main, ["src", "--out", "o"]),
    }


@pytest.mark.parametrize("name", ["dpkit-train", "dpkit-export", "dpkit-eval", "dpkit-bench", "dpkit-convert"])
def test_every_cli_takes_threads_and_refuses_a_bad_value_in_one_line(name, capsys):
    parser, main, required = _parsers()[name]
    assert parser.parse_args([*required, "--threads", "3"]).threads == 3
    assert parser.parse_args(required).threads == 0  # absent: the rule decides
    for bad in ("-2", "two", "1.5"):
        with pytest.raises(SystemExit) as e:
            main([*required, "--threads", bad])
        assert e.value.code == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: --threads must be an integer"), err
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"{name} 0.")


def test_no_progress_everywhere_and_quiet_kept():
    parsers = _parsers()
    for name in ("dpkit-train", "dpkit-export", "dpkit-eval", "dpkit-bench", "dpkit-convert"):
        parser, _, required = parsers[name]
        assert parser.parse_args([*required, "--no-progress"]).no_progress
    parser, _, required = parsers["dpkit-eval"]
    assert parser.parse_args([*required, "--quiet"]).no_progress  # the older spelling still works


def test_threads_reach_the_report(tmp_path, monkeypatch):
    """dpkit-eval records the choice under "threads"; --threads is passed on to the whole command."""
    from dpkit.eval import evaluate

    monkeypatch.delenv("DPKIT_THREADS", raising=False)
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--random", "--episodes", "1", "--max-steps", "8", "--threads", "2", "--no-progress",
                       "--json", str(out)])
    assert e.value.code == 0
    t = json.loads(out.read_text())["threads"]
    assert t["threads"] == 2 and t["wait_policy"] == "passive" and t["usable_cpus"] >= 1
    assert os.environ.get("DPKIT_THREADS") == "2"


def test_backends_apply_the_rule_and_threads(monkeypatch):
    """`threads=` means the same in the ort and cpp backends; without it, the rule (here: a tiny bundle)."""
    from dpkit.runtime import load_policy

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("DPKIT_THREADS", raising=False)
    monkeypatch.delenv("DPKIT_ORT_THREADS", raising=False)
    ort = load_policy(GOLDEN, backend="ort")
    assert ort.threads.threads == 1 and ort.threads.source == "policy" and not ort.threads.spin
    assert ort.denoiser.get_session_options().intra_op_num_threads == 1
    ort2 = load_policy(GOLDEN, backend="ort", threads=2, allow_spinning=False)
    assert ort2.denoiser.get_session_options().intra_op_num_threads == 2
    try:
        cpp = load_policy(GOLDEN, backend="cpp", max_batch=1)
    except DpkitError as e:  # a runtime-only install without the C++ module
        pytest.skip(str(e))
    assert cpp.threads.threads == 1 and not cpp.threads.spin
    assert load_policy(GOLDEN, backend="cpp", threads=2, spin=False, max_batch=1).threads.threads == 2
    with pytest.raises(InputError, match="threads must be"):
        load_policy(GOLDEN, backend="cpp", threads=-1)


# --------------------------------------------------------------------------- the demo's warning


def test_time_limit_warns_that_the_policy_is_under_trained(train_store, tmp_path):
    """A time limit that stops training early: the CLI's last line and the demo report say so."""
    cmd = [sys.executable, "-m", "dpkit.train.cli", "--config", "tiny", "--data", str(train_store),
           "--out", str(tmp_path / "run"), "--steps", "50", "--no-progress", "--json", str(tmp_path / "train.json"),
           *SMALL_TRAIN, "train.time_limit_s=0.001"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("WARNING: train.time_limit_s=0.001 stopped training at step 1 of 50"), proc.stdout
    assert "not representative" in last
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["stopped_by_time_limit"] and train["target_steps"] == 50 and train["threads"]["threads"] == 1

    # The demo's report, from this train.json and minimal stage outputs.
    out = tmp_path / "demo"
    (out / "bundle").mkdir(parents=True)
    (out / "train.json").write_text(json.dumps(train))
    (out / "bundle" / "policy.json").write_text("{}")
    ev = {"score": 0.1, "success_rate": 0.0, "episodes": [{}], "backend": "cpp", "threads": {"threads": 1}}
    for name in ("eval_cpp", "eval_torch", "eval_random"):
        (out / f"{name}.json").write_text(json.dumps(ev))
    (out / "bench.json").write_text(json.dumps({"machine": {"cores": 2, "gemm_fp32_gflops": 1, "mem_gbps": 1},
                                                "threads": {"per_model": {"tiny": 1}}}))
    loads = {"train": {"min": 1.0, "mean": 1.5, "max": 2.0, "samples": 3}}
    report = demo._report(out, None, {"train": 1.0, "export": 2.0}, loads)
    head = report.split("## Task score")[0]
    assert "WARNING: training stopped by its time limit" in head and "at step 1 of 50" in head
    assert "| train | 1 | 1.50 | 2.00 | 1 (no spinning) |" in report and "| export | 2 | – | – | – |" in report
    assert demo.training_warning({"steps": 50, "target_steps": 50, "stopped_by_time_limit": False}) == []


# --------------------------------------------------------------------------- dpkit-bench --contention


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_busy_processes_run_in_their_own_sessions_and_stop():
    from dpkit.benchmarks.contention import BusyProcesses

    with BusyProcesses(2, max_seconds=60) as busy:
        pids = [p.pid for p in busy.procs]
        assert all(os.getsid(pid) == pid != os.getsid(0) for pid in pids)  # each leads its own session
        assert {_state(pid) for pid in pids} == {"T"}  # created paused
        busy.run()
        assert {_state(pid) for pid in pids} <= {"R", "S"}
        busy.pause()
        assert {_state(pid) for pid in pids} == {"T"}
    assert all(not Path(f"/proc/{pid}").exists() or _state(pid) == "Z" for pid in pids)
    with pytest.raises(DpkitError, match="--contention"):
        BusyProcesses(-1)


def test_contention_rows_are_reported_against_the_quiet_ones():
    from dpkit.benchmarks import latency

    s = latency.settings_from_args(latency.build_parser().parse_args(["--quick", "--contention", "2"]))
    assert s.contention == 2
    with pytest.raises(DpkitError, match="--contention"):
        latency.settings_from_args(latency.build_parser().parse_args(["--contention", "-1"]))
    base = {"backend": "cpp", "model": "tiny", "kind": "chunk", "batch": 1, "sampler": "ddim", "steps": 10,
            "threads": 1}
    rows = [{**base, "p50_ms": 10.0, "p99_ms": 12.0, "contention": 0},
            {**base, "p50_ms": 15.0, "p99_ms": 30.0, "contention": 2}]
    latency.add_vs_quiet(rows)
    assert rows[1]["vs_quiet_p50"] == 1.5 and rows[1]["vs_quiet_p99"] == 2.5 and "vs_quiet_p50" not in rows[0]
    table = "\n".join(latency.contention_table({"rows": rows, "contention": 2}))
    assert "Beside 2 busy processes" in table and "| tiny | cpp | 1 | ddim-10 | 1 | 10.00 | 15.00 | 1.50 |" in table


# --------------------------------------------------------------------------- controller: affinity, SCHED_FIFO

_OBS = "{'obs': __import__('numpy').full((1, 20), 256, 'float32')}"
_REFUSED_FIFO = f"""
import os, resource, sys
from dpkit.runtime import load_policy
from dpkit.runtime.realtime import CppRealTimeController, RealTimeController
p = load_policy(sys.argv[1], backend="cpp", max_batch=1)
reference = load_policy(sys.argv[1], backend="ort")
import concurrent.futures.thread  # everything is loaded before we lose the right to read root's files
resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
if os.getuid() == 0:  # root has CAP_SYS_NICE: become nobody, who may not use SCHED_FIFO
    os.setgid(65534)
    os.setuid(65534)
with CppRealTimeController(p, delay=1, worker_priority=10) as c:
    for _ in range(10):
        c.step({_OBS})
    print(c.stats.chunks, c.worker_setup)
print(RealTimeController(reference, delay=1, worker_priority=10).worker_setup)
"""


def test_controller_worker_affinity_and_realtime_priority():
    """Applied where permitted; refused with a clear reason and carrying on where not."""
    from dpkit.runtime import load_policy
    from dpkit.runtime.realtime import CppRealTimeController, RealTimeController

    try:
        policy = load_policy(GOLDEN, backend="cpp", threads=1, max_batch=1)
    except DpkitError as e:
        pytest.skip(str(e))
    cpu = min(os.sched_getaffinity(0))
    with CppRealTimeController(policy, delay=1, worker_cpus=[cpu]) as ctl:
        assert ctl.worker_setup == f"worker pinned to CPUs {cpu}"
        for _ in range(10):
            ctl.step(eval(_OBS))
        assert ctl.stats.chunks >= 2
    with CppRealTimeController(policy, delay=1, worker_cpus="1000") as ctl:  # not a CPU this process may use
        setup = ctl.worker_setup
        assert setup.startswith("worker CPU affinity {1000} refused (") and "runs on any CPU" in setup
        ctl.step(eval(_OBS))
    assert CppRealTimeController(policy, delay=1).worker_setup == ""
    reference = load_policy(GOLDEN, backend="ort", threads=1)  # the Python reference: the same options, words
    assert RealTimeController(reference, delay=1, worker_cpus=[cpu]).worker_setup == f"worker pinned to CPUs {cpu}"
    assert RealTimeController(reference, delay=1, worker_cpus=[1000]).worker_setup == setup
    for make, pol in ((CppRealTimeController, policy), (RealTimeController, reference)):
        for bad in ({"worker_priority": 100}, {"worker_priority": True}, {"worker_cpus": [-1]}, {"worker_cpus": "a"}):
            with pytest.raises(InputError):
                make(pol, **bad)
    run = subprocess.run([sys.executable, "-c", _REFUSED_FIFO, str(GOLDEN)], capture_output=True, text=True,
                         timeout=120, env=_env(OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    cpp_line, reference_line = run.stdout.strip().splitlines()
    chunks, setup = cpp_line.split(" ", 1)
    assert int(chunks) >= 2 and setup.startswith("SCHED_FIFO priority 10 refused (Operation not permitted"), setup
    assert reference_line == setup
