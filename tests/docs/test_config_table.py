"""docs/configuration.md states each key's default once, as the schema and the shipped configs have it: its table
is the one `config_table.py` generates from them."""

from __future__ import annotations

from config_table import ROOT, markdown, rows, table_in_page


def test_the_configuration_page_lists_every_key_as_the_code_defines_it():
    page = table_in_page(ROOT / "docs/configuration.md")
    expected = markdown(rows())
    assert page == expected, "docs/configuration.md is out of date: paste `python tests/docs/config_table.py` into it"


def test_the_table_covers_every_field_of_every_group():
    keys = {row[0] for row in rows()[1:]}
    assert {"`sae.num_latents`", "`trainer.lr_rule`", "`data.pretokenize`", "`parallel.a2a_chunks`",
            "`parallel.timeout_s`"} <= keys
    assert len(keys) == len(rows()) - 1  # one row per key
