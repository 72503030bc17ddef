"""The credit viewer over a multi-turn (agent) completion: the environment's tokens shown apart, with no credit
colour, and each model turn after a tool result marked."""

from __future__ import annotations

import re

from rlsd.experiments.report import render_tokens


def test_the_viewer_greys_tool_result_tokens_and_marks_turn_boundaries():
    """Turn 0 calls the tool, the environment writes two tokens, turn 1 answers, the environment writes one more and
    turn 2 closes; the model's weights 1.2 (green, saturated) and 0.8 (red, saturated) keep their colours."""
    example = {
        "tokens": ["[call]", "<eos>", "\nT: 5", "\nA: ", "5", "!", "\nT: ok", "<eos>"],
        "env_mask": [1, 1, 0, 0, 1, 1, 0, 1],
        "delta": [0.1, -0.1, 0.0, 0.0, 0.2, -0.2, 0.0, 0.05],
        "weight": [1.1, 0.9, 1.0, 1.0, 1.3, 0.7, 1.0, 1.05],
        "clipped_weight": [1.2, 0.8, 1.0, 1.0, 1.2, 0.8, 1.0, 1.0],
    }
    page = render_tokens(example)
    spans = re.findall(r'<span class="(tok[^"]*|turn)"([^>]*)>([^<]*)</span>', page)
    assert [(kind, text) for kind, _, text in spans] == [
        ("tok", "[call]"), ("tok", "&lt;eos&gt;"), ("tok env", "\nT: 5"), ("tok env", "\nA: "),
        ("turn", "turn 1 &#9656;"), ("tok", "5"), ("tok", "!"), ("tok env", "\nT: ok"),
        ("turn", "turn 2 &#9656;"), ("tok", "&lt;eos&gt;"),
    ]  # fmt: skip
    attributes = [attrs for _, attrs, _ in spans]
    assert 'data-turn="1"' in attributes[4] and 'data-turn="2"' in attributes[8]
    for index in (2, 3, 7):  # the environment's tokens: no credit colour, no Delta
        assert "background" not in attributes[index] and "data-delta" not in attributes[index]
        assert "written by the environment" in attributes[index]
    assert "rgba(40, 160, 60, 0.85)" in attributes[0] and "rgba(210, 50, 50, 0.85)" in attributes[6]


def test_a_single_turn_completion_renders_as_before():
    """Without an env_mask every token is the model's: no environment token, no turn marker."""
    example = {"tokens": ["4", "2"], "delta": [0.1, -0.1], "weight": [1.1, 0.9], "clipped_weight": [1.2, 0.8]}
    page = render_tokens(example)
    assert page.count('class="tok"') == 2 and "env" not in page and 'class="turn"' not in page
