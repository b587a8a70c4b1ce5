"""`rast analyze kld --html FILE`: the paper's Fig. 5 view of a KLD report, each trajectory's text with every
token shaded by its KL(M̃ ‖ M_base), so the places where ΔR moved the large model stand out.

Shading: opacity log(1 + kld) / log(1 + the report's largest finite kld), so one outlier ("check" at 837 in
the paper) does not wash out the rest; an infinite KLD is fully shaded. Each token's exact value is its
``title`` (shown on hover) and ``data-kld``, with the large model's own choice where it would have taken
another token. A token's text is what it adds to the decoded trajectory (token_pieces), so the page reads
as the decoded text, characters split across tokens included.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Callable

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; }}
.path {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.6; }}
.path span {{ border-radius: 2px; }}
</style></head><body>
<h1>{title}</h1>
<p>{summary}</p>
{sections}
</body></html>
"""


def token_pieces(decode: Callable[[list[int]], str], ids: list[int]) -> list[str]:
    """What each token adds to decode(ids), so that their concatenation is decode(ids): a token that ends
    inside a character (its prefix decodes to a trailing U+FFFD) adds nothing until the character is whole.
    A tokenizer whose decoding of a longer prefix rewrites earlier text gets each token decoded alone."""
    pieces, done = [], ""
    for i in range(len(ids)):
        text = decode(ids[:i + 1])
        if not text.startswith(done):
            return [decode([t]) for t in ids]
        held = text.endswith("\ufffd") and i + 1 < len(ids)
        pieces.append("" if held else text[len(done):])
        done = done if held else text
    return pieces


def _span(piece: str, kld: float, scale: float, instead: str | None) -> str:
    alpha = 1.0 if math.isinf(kld) else 0.0 if scale == 0 else min(1.0, math.log1p(kld) / scale)
    title = f"KLD {kld:.4g}" + ("" if instead is None else f"; M alone: {instead!r}")
    return (f'<span style="background: rgba(0, 160, 0, {alpha:.3f})" title="{html.escape(title)}" '
            f'data-kld="{kld!r}">{html.escape(piece)}</span>')


def write_kld_html(report: dict[str, Any], path: Path) -> None:
    """The page of a run_kld report; a token the large model alone would not have chosen (its argmax there
    differs) names that choice."""
    finite = [k for t in report["trajectories"] for k in t["kld"] if not math.isinf(k)]
    scale = math.log1p(max(finite, default=0.0))
    sections = []
    for t in report["trajectories"]:
        spans = "".join(_span(p, k, scale, None if m == tok else text) for p, k, tok, m, text in
                        zip(t["pieces"], t["kld"], t["completion_ids"], t["large_argmax"], t["large_choice"]))
        sections.append(f'<section><h2>{html.escape(str(t["id"]))}</h2>'
                        f'<p>{t["tokens"]} tokens, mean KLD {t["mean_kld"]:.4f}</p>'
                        f'<div class="path">{spans}</div></section>')
    title = "KL(M\u0303 \u2016 M_base) per token"
    summary = (f'\u03bb {report["lam"]}; mean KLD {report["mean_kld"]:.4f} over {report["num_tokens"]} tokens of '
               f'{report["num_trajectories"]} trajectories; darker is larger (log scale, hover for the value)')
    path.write_text(PAGE.format(title=html.escape(title), summary=html.escape(summary),
                                sections="\n".join(sections)), encoding="utf-8")
