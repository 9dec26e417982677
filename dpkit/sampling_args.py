"""The caller's sampling arguments — which sampler, how many steps, which seed — checked and resolved once.

    from dpkit.sampling_args import resolve_sampler
    resolve_sampler(None, 5, default=("ddim", 10), largest={"ddpm": 100, "ddim": 100})   # ("ddim", 5)

This is the one Python home of the rule (the C++ runtime has the other: `Policy::find_sampler`):
  - no sampler given: the default sampler's kind;
  - no steps given: the default sampler when it is of that kind, else the kind's largest K.
Every backend (the PyTorch policy, "ort", "cpp") resolves through it, so one call means the same
reverse process everywhere. It lives in the core package because both the model (dpkit.train) and the
runtime (dpkit.runtime) use it and neither may import the other's direction of the pipeline.
"""

from __future__ import annotations

import numbers
from typing import Any

from dpkit.errors import InputError

SAMPLERS = ("ddpm", "ddim", "fewstep")  # dpkit.sampling.KINDS: fewstep is a distilled student's
MAX_SEED = 2**63 - 1
"""The largest seed anywhere in dpkit: sampling (`seed=`), train.seed and data.split_seed. Every consumer
takes it: numpy's default_rng and SeedSequence (any non-negative int), torch's manual_seed (< 2**64), the C++
runtime (uint64), and JSON/YAML readers that hold integers in int64 (the resolved config travels in
state.json and policy.json). numpy's legacy global seeding takes only [0, 2**32): the trainer feeds it a
larger seed as its 32-bit words (dpkit.train.trainer.seed_everything)."""


def check_sampler(sampler: Any) -> str | None:
    if sampler is None:
        return None
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r} (expected 'ddpm', 'ddim' or 'fewstep')")
    return sampler


def check_steps(steps: Any, num_inference_steps: Any = None) -> int | None:
    """`steps` and its long name `num_inference_steps` (either, or both if equal) -> a positive int or None."""
    if steps is not None and num_inference_steps is not None and _as_int(steps, "steps") != _as_int(
            num_inference_steps, "num_inference_steps"):
        raise InputError(f"steps={steps!r} and num_inference_steps={num_inference_steps!r} disagree")
    value = steps if steps is not None else num_inference_steps
    if value is None:
        return None
    k = _as_int(value, "steps")
    if k < 1:
        raise InputError(f"steps must be a positive integer, got {value!r}")
    return k


def check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    s = _as_int(seed, "seed")
    if not 0 <= s <= MAX_SEED:
        raise InputError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return s


def resolve_sampler(sampler: str | None, steps: int | None, *, default: tuple[str, int],
                    largest: dict[str, int]) -> tuple[str, int | None]:
    """(kind, K) for a call. `default`: the policy's default (kind, K); `largest`: per kind, its largest K
    (a kind missing from it is not available). K is None only when the kind is not available."""
    kind = check_sampler(sampler) or default[0]
    k = check_steps(steps)
    if k is None:
        k = default[1] if kind == default[0] else largest.get(kind)
    return kind, k


def parse_sampler_label(text: Any, what: str = "sampler") -> tuple[str, int]:
    """`"ddim-10"` (or `"ddim:10"`) -> `("ddim", 10)`: the one spelling of a sampler with its step count,
    used by dpkit-bench --samplers and train.eval_samplers. `what` names the field in the error."""
    kind, sep, k = str(text).replace(":", "-").partition("-")
    if not isinstance(text, str) or kind not in SAMPLERS or not sep or not k.isdigit() or int(k) < 1:
        raise InputError(f"{what} {text!r} is not SAMPLER-K with SAMPLER ddpm, ddim or fewstep (e.g. ddim-10)")
    return kind, int(k)


def sampler_label(kind: str, k: int) -> str:
    return f"{kind}-{k}"


def _as_int(value: Any, name: str) -> int:
    # bool is an int to Python but never a step count or seed; floats (10.6 or 10.0) are refused, not rounded.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)
