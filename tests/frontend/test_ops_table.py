"""The README's supported-op list is generated from the op table, not written by hand."""

from pathlib import Path

from tensorprograms.frontend.ops import BEGIN, END, supported_ops_markdown


def test_readme_op_list_is_generated_from_the_table():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start, stop = readme.index(BEGIN), readme.index(END) + len(END)
    assert readme[start:stop] == supported_ops_markdown(), (
        "README's op list is stale: regenerate it with `python -m tensorprograms.frontend.ops`"
    )
