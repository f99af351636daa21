import pytest

from lpq.config import ConfigError, from_dict, load_config, to_dict
from lpq.quant import QuantRecipe, QuantizerSpec, Scaling


def test_short_form_fills_weight_and_input():
    r = from_dict({"format": "hif4", "protected_blocks": [0, 29]}, QuantRecipe)
    assert r.weight.format == r.input.format == "hif4"
    assert r.grad is None and r.attention is None
    assert r.weight.scaling == Scaling.NONE


def test_round_trip_through_to_dict():
    data = {"weight": {"format": "hif8", "scaling": "delayed", "history_len": 8, "reduction": "most_recent",
                       "margin": 1},
            "input": {"format": "hif8", "scaling": "current", "target": "amax", "amax_target": 256.0},
            "grad": {"format": "hif8"},
            "attention": {"format": "hif8", "p": {"format": "hif8", "scaling": "none"}},
            "exclude": ["*.mlp.down_proj"], "protected_blocks": [3]}
    r = from_dict(data, QuantRecipe)
    assert r.attention.v.axis == -2 and r.attention.q.axis == -1
    again = from_dict(to_dict(r), QuantRecipe)
    assert again == r
    assert to_dict(again) == to_dict(r)
    assert to_dict(r)["version"] == 1


def test_yaml_errors_name_file_and_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("format: hif4\nweight:\n  format: hif4\n  scaling: sometimes\n")
    with pytest.raises(ConfigError, match=r"r.yaml:4: 'weight.scaling': 'sometimes' is not allowed; use one of 'none'"):
        load_config(p, QuantRecipe)
    p.write_text("format: hif4\nprotected_blocks: [0, x]\n")
    with pytest.raises(ConfigError, match=r"r.yaml:2: 'protected_blocks\[1\]' must be int"):
        load_config(p, QuantRecipe)
    # A check of the whole section that is about one key is reported at that key's line (schema.KeyedError).
    p.write_text("format: hif4\nallow_over_budget: true\n\nprotected_blocks: [1, 1]\n")
    with pytest.raises(ConfigError, match=r"r.yaml:4: protected_blocks has duplicates: \[1, 1\]"):
        load_config(p, QuantRecipe)
    with pytest.raises(ConfigError, match=r"unknown format 'fp7'; valid formats: hif8"):
        from_dict({"format": "fp7"}, QuantizerSpec)


@pytest.mark.parametrize("fmt,budget", [("hif4", 2), ("mxfp4", 5), ("hif8", 5)])
def test_block_budget_enforced_with_override(fmt, budget):
    assert from_dict({"format": fmt}, QuantRecipe).block_budget() == budget
    ok = list(range(budget))
    assert from_dict({"format": fmt, "protected_blocks": ok}, QuantRecipe).protected_blocks == ok
    too_many = list(range(budget + 1))
    with pytest.raises(ConfigError, match=f"exceed the challenge budget of {budget} for {fmt}.*allow_over_budget"):
        from_dict({"format": fmt, "protected_blocks": too_many}, QuantRecipe)
    r = from_dict({"format": fmt, "protected_blocks": too_many, "allow_over_budget": True}, QuantRecipe)
    assert r.protected_blocks == too_many


def test_mixed_formats_use_the_strictest_budget():
    r = QuantRecipe(weight=QuantizerSpec("hif4"), input=QuantizerSpec("hif8"))
    assert r.block_budget() == 2


def test_bad_recipes_rejected():
    with pytest.raises(ValueError, match="quantizes nothing"):
        QuantRecipe()
    with pytest.raises(ValueError, match="version 2 is not supported"):
        QuantRecipe(version=2, format="hif8")
    with pytest.raises(ValueError, match="needs an explicit amax_target"):
        QuantizerSpec("hif4", scaling="current", target="amax")
    with pytest.raises(ValueError, match="duplicates"):
        QuantRecipe(format="hif8", protected_blocks=[1, 1])


@pytest.mark.parametrize("center", [16, -16, 99, float("inf"), float("nan")])
def test_a_window_center_outside_the_format_is_refused(center):
    with pytest.raises(ValueError, match="window_center"):
        QuantizerSpec("hif8", scaling="current", window_center=center)
    QuantizerSpec("hif8", scaling="current", window_center=15)      # the RMS at the largest value: allowed
