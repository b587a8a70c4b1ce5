"""Issue 4's decode targets, judged on bench/decode.py's rows: each row's roofline fraction and its ratios
to base of the same pairing and batch are added in place, and the four targets come back with their
verdicts (missed targets are recorded like met ones). The two batch-1 targets are judged twice: against
the floor (the weights a step reads: not the input embedding, of which it gathers B rows) and against
every weight's bytes, as the issue words its roofline; the floor is the stricter."""
from __future__ import annotations

from typing import Optional


def judge(rows: list[dict], pairings: list[str]) -> dict:
    """rast/base per (pairing, batch) and the issue's four targets, where their rows exist. An FP8 mode's
    base is base-fp8."""
    by = {(r["mode"], r["pairing"], r["batch"]): r for r in rows}
    for r in rows:
        r["roofline_frac"] = r["step_ms"] / r["roofline_ms"]
        if "roofline_all_weights_ms" in r:  # rows before c09caee hold the floor alone
            r["roofline_all_weights_frac"] = r["step_ms"] / r["roofline_all_weights_ms"]
        base_mode = "base-fp8" if r["mode"].endswith("-fp8") else "base"
        b = by.get((base_mode, r["pairing"], r["batch"]))
        if b is not None and r["mode"] != base_mode:
            r["weight_bytes_ratio"] = r["weight_bytes_read"] / b["weight_bytes_read"]
            r["time_vs_base"] = r["step_ms"] / b["step_ms"]
            r["time_vs_base_over_wb"] = r["time_vs_base"] / r["weight_bytes_ratio"]
            if "weight_bytes_all" in r and "weight_bytes_all" in b:
                r["time_vs_base_over_wb_all"] = r["time_vs_base"] / (r["weight_bytes_all"] / b["weight_bytes_all"])
    targets = []

    def target(name: str, value: Optional[float], limit: float, at_most: bool,
               bound: Optional[float] = None) -> None:
        """bound: the best value the rooflines allow, where the target is a ratio of two modes."""
        if value is not None:
            targets.append(dict(target=name, value=value, limit=limit, roofline_bound=bound,
                                met=value <= limit if at_most else value >= limit))

    for p in pairings:
        r1, r32 = by.get(("rast", p, 1)), by.get(("rast", p, 32))
        b32, h32 = by.get(("base", p, 32)), by.get(("hf-rast", p, 32))
        target(f"{p} b1 rast step / roofline", r1 and r1["roofline_frac"], 1.15, True)
        target(f"{p} b1 rast step / all-weights roofline (issue 4's words)",
               r1 and r1.get("roofline_all_weights_frac"), 1.15, True)
        target(f"{p} b1 (rast/base) / weight-bytes ratio", r1 and r1.get("time_vs_base_over_wb"), 1.05, True)
        target(f"{p} b1 (rast/base) / all-weight-bytes ratio (issue 4's words)",
               r1 and r1.get("time_vs_base_over_wb_all"), 1.05, True)
        if p == "7b+1.5b":
            # both modes read their weights once per step: at best rast runs at base's roofline
            # over its own (about 0.69 for 7B + 2 x 1.5B, whatever the kernels)
            target(f"{p} b32 rast / base tokens/s", r32 and b32 and r32["tokens_per_s"] / b32["tokens_per_s"],
                   0.8, False, r32 and b32 and b32["roofline_ms"] / r32["roofline_ms"])
        target(f"{p} b32 rast / hf-rast tokens/s", r32 and h32 and r32["tokens_per_s"] / h32["tokens_per_s"],
               10.0, False)
    return dict(targets=targets)
