"""`rast analyze kld --html` (engine/analysis/kld_html.py): the paper's Fig. 5 view of a KLD report.

Oracles: the report's own per-token KLD values (held to HF transformers in test_analysis.py) and the
tokenizer's decoding of each path, which the page's token texts must join back into."""
from __future__ import annotations

import json
from html.parser import HTMLParser

from rast_engine.analysis.kld_html import token_pieces
from rast_engine.cli import main
from test_analysis import MAX_TOKENS, PROBLEMS, setup  # noqa: F401 - setup: the module's fixture


class _Spans(HTMLParser):
    """Each section's token spans of a --html page: (text, data-kld) in order."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[list[list]] = []
        self.open: list | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "section":
            self.paths.append([])
        elif tag == "span":
            self.open = ["", float(dict(attrs)["data-kld"]), dict(attrs)["title"]]
            self.paths[-1].append(self.open)

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self.open = None

    def handle_data(self, data: str) -> None:
        if self.open is not None:
            self.open[0] += data


def test_kld_html_shades_each_token_of_the_decoded_paths(setup: dict, capsys) -> None:  # noqa: ANN001, F811
    d, root = setup["dirs"], setup["root"]
    assert main(["analyze", "kld", "--model", str(d["large"]), "--small-rl", str(d["rl"]), "--small-base",
                 str(d["base"]), "--data", str(setup["data"]), "--template", str(setup["template"]),
                 "--max-tokens", str(MAX_TOKENS), "--device", "cpu", "--dtype", "float32",
                 "--out", str(root / "kld.json"), "--html", str(root / "kld.html")]) == 0
    capsys.readouterr()
    report = json.loads((root / "kld.json").read_text())
    page = _Spans()
    page.feed((root / "kld.html").read_text(encoding="utf-8"))
    assert len(page.paths) == len(report["trajectories"]) == len(PROBLEMS)
    tok, named = setup["tok"], 0
    for spans, traj in zip(page.paths, report["trajectories"]):
        assert "".join(text for text, _, _ in spans) == tok.decode(traj["completion_ids"])
        assert [k for _, k, _ in spans] == traj["kld"]  # every token, its exact value, in order
        for (_, _, title), chosen, alone in zip(spans, traj["completion_ids"], traj["large_argmax"]):
            # the large model's own choice is named where it differs from the path's token
            assert title.endswith(f"; M alone: {tok.decode([alone])!r}") == (alone != chosen), title
            named += alone != chosen
    assert named  # the tiny triple's delta does move some choices


def test_token_pieces_hold_a_split_character_until_it_is_whole() -> None:
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    ids = list("hé€x".encode())
    assert token_pieces(decode, ids) == ["h", "", "é", "", "", "€", "x"]
    assert token_pieces(decode, [97, 0xE2, 0x82]) == ["a", "", "\ufffd"]  # a character the path never finished
