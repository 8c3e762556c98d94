"""The one Markdown table helper."""

import pytest

from gptlab.tables import markdown_table


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x"], ["", 2.5]]) == "| a | b |\n|---|---|\n| 1 | x |\n| | 2.5 |"
    assert markdown_table(["name", "n", "mid"], [], "lrc").splitlines()[1] == "|---|---:|:---:|"
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [], "l")
