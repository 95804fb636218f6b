"""docs/configuration.md states each option's default, its values in the shipped configs and its declared facts
once, as the code has them: its tables are the ones `config_table.py` generates."""

from __future__ import annotations

import pytest
from config_table import block_in_page, composed_values, generated_block, rows

from sae_dist.config import option_facts, options_where


def test_the_configuration_page_lists_every_option_as_the_code_defines_it():
    assert block_in_page() == generated_block(), (
        "docs/configuration.md is out of date: python tests/docs/config_table.py --write")


@pytest.fixture(scope="module")
def tables() -> dict[bool, list[list[str]]]:
    composed = composed_values()
    return {performance: rows(performance, composed) for performance in (False, True)}


def test_every_option_has_one_row_and_the_performance_switches_a_table_apart(tables):
    keys = {performance: [row[0].strip("`") for row in table[1:]] for performance, table in tables.items()}
    assert keys[True] == list(options_where(lambda facts: facts.performance))
    assert sorted(keys[False] + keys[True]) == sorted(option_facts())
    assert {"name", "sweep", "sae.num_latents", "trainer.lr_rule", "parallel.timeout_s"} <= set(keys[False])


def test_a_row_shows_the_composed_values_and_the_declared_facts(tables):
    by_key = {row[0]: row for row in tables[False][1:]}
    assert tables[False][0][:4] == ["key", "default", "`python launch/train.py`", "`+experiment=switch_65k`"]
    assert by_key["`sae.num_latents`"][1:7] == ["`65536`", "`6144`", "`65536`", "fixed", "yes",
                                              "`sae_dist.validation.validate`"]
    assert by_key["`trainer.out_dir`"][2:6] == ["`runs/quickstart/<date>_<time>`",
                                                "`runs/switch_65k/<date>_<time>`", "per command", "no"]
    assert by_key["`parallel.ep_size`"][4] == "**may change**"
    assert by_key["`parallel.ep_size`"][-1].startswith("P, the ranks that together hold all experts; null = the world")
