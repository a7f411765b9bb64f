"""The latency issue's targets (3B -> 1B pair, real sizes, H100), read off a latency results JSON.

One issue's acceptance goals, kept out of the library: reported as reached or not, never asserted.

    python -m benchmarks.latency_targets results/gpu/h100.json [more.json ...]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from overfill_lib import latency

TARGETS = {
    "decode_bandwidth_fraction": (">=", 0.80),
    "overfill_over_decoder_e2e": ("<=", 1.10),
    "full_over_overfill_per_token": (">=", 2.3),
    "eager_over_fast_per_token": (">=", 10.0),
}


def _find(records, name, method, *, fast: bool = True, **point) -> dict | None:
    for r in records:
        if r.get("pair") != name or r.get("method") != method or r.get("status") != "ok":
            continue
        if fast != r.get("path", "").startswith("fast"):
            continue
        if all(r.get(k) == v for k, v in point.items()):
            return r
    return None


def _target(name: str, value: float | None) -> dict:
    op, goal = TARGETS[name]
    met = None if value is None else (value >= goal if op == ">=" else value <= goal)
    return {"value": value, "target": f"{op} {goal}", "met": met}


def report(results: dict, name: str) -> dict:
    """The four targets as reached by pair ``name`` of ``results`` (from its records; ``None`` when not measured)."""
    s = results["settings"]
    records = results["records"]
    base = dict(batch=1, prompt=s["base_prompt"], new_tokens=s["base_new_tokens"])
    out = {}
    r = _find(records, name, "overfill", **base)
    out["decode_bandwidth_fraction"] = _target("decode_bandwidth_fraction", r and r.get("bandwidth_fraction"))
    ratios = []
    for o in (x for x in records if x.get("pair") == name and x.get("method") == "overfill" and x.get("status") == "ok"
              and x.get("path", "").startswith("fast") and x["batch"] == 1 and x["new_tokens"] >= 256):
        d = _find(records, name, "decoder", batch=1, prompt=o["prompt"], new_tokens=o["new_tokens"])
        if d:
            ratios.append(o["e2e_s"]["median"] / d["e2e_s"]["median"])
    out["overfill_over_decoder_e2e"] = _target("overfill_over_decoder_e2e", max(ratios) if ratios else None)
    f = _find(records, name, "full", **base)
    out["full_over_overfill_per_token"] = _target(
        "full_over_overfill_per_token",
        f["per_token_s"]["median"] / r["per_token_s"]["median"] if (f and r and r.get("per_token_s")) else None)
    n = s.get("eager_new_tokens") or s["base_new_tokens"]
    eager = _find(records, name, "overfill", fast=False, batch=1, prompt=s["base_prompt"], new_tokens=n)
    fast = _find(records, name, "overfill", batch=1, prompt=s["base_prompt"], new_tokens=n)
    value = None
    if eager and fast and eager.get("per_token_s") and fast.get("per_token_s"):
        value = eager["per_token_s"]["median"] / fast["per_token_s"]["median"]
    out["eager_over_fast_per_token"] = _target("eager_over_fast_per_token", value)
    out["eager_over_fast_per_token"]["paths"] = [eager and eager["path"], fast and fast["path"]]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for path in paths:
        results = latency.load_results(path)
        for name in results["pairs"]:
            for key, b in report(results, name).items():
                print(f"{path} {name} {key}: {b['value']} (target {b['target']}, met={b['met']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
