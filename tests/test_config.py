import enum
from dataclasses import dataclass, field

import pytest

from lpq.config import ConfigError, from_dict, load_config, to_dict


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Inner:
    n: int = 1
    color: Color = Color.RED


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    ids: list[int] = field(default_factory=list)
    ratio: float = 0.5
    extra: Inner | None = None


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, "name: a\ninner:\n  n: 3\n  color: blue\nids: [1, 2]\nratio: 2\n"), Outer)
    assert cfg == Outer("a", Inner(3, Color.BLUE), [1, 2], 2.0)
    assert from_dict(to_dict(cfg), Outer) == cfg


def test_unknown_key_names_file_line_and_allowed(tmp_path):
    p = write(tmp_path, "name: a\ninner:\n  n: 3\n  colour: blue\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, Outer)
    msg = str(e.value)
    assert f"{p}:4" in msg and "inner.colour" in msg and "n, color" in msg
    p = write(tmp_path, "name: a\nmore: 1\n")
    with pytest.raises(ConfigError, match=r":2: unknown key 'more'; allowed at the top level: name, inner, ids"):
        load_config(p, Outer)


def test_bad_enum_value_lists_allowed(tmp_path):
    with pytest.raises(ConfigError, match=r"r.yaml:3: 'inner.color': 'green' is not allowed; use one of 'red', 'blue'"):
        load_config(write(tmp_path, "name: a\ninner:\n  color: green\n"), Outer)


def test_wrong_type_and_missing_key(tmp_path):
    with pytest.raises(ConfigError, match="'ids\\[1\\]' must be int"):
        load_config(write(tmp_path, "name: a\nids: [1, x]\n"), Outer)
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        load_config(write(tmp_path, "ratio: 1.0\n"), Outer)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml", Outer)


@pytest.mark.parametrize("text, message", [
    ("name: a\n inner: [\n", r"r.yaml:2: not valid YAML: mapping values are not allowed here"),
    ("name: \"a\n", r"r.yaml:2: not valid YAML: while scanning a quoted scalar, found unexpected end of stream"),
    ("name:\n\tinner: 1\n", r"r.yaml:2: not valid YAML: .*'\\t' that cannot start any token"),
])
def test_a_yaml_syntax_error_is_one_line_with_file_and_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(write(tmp_path, text), Outer)
    assert "\n" not in str(e.value)


def test_a_file_that_is_not_text_or_not_a_file_is_named(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"r.yaml: not UTF-8 text \(byte 6\)"):
        load_config(p, Outer)
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"d.yaml: a folder, not a recipe file"):
        load_config(tmp_path / "d.yaml", Outer)


def test_overrides_apply_before_validation(tmp_path):
    cfg = load_config(write(tmp_path, "name: a\n"), Outer, overrides={"inner.n": 7})
    assert cfg.inner.n == 7


@dataclass
class WithSection:
    inner: Inner = None  # type: ignore[assignment]   # optional section, as TrainRecipe.export / .eval


def test_optional_section_may_be_null_and_round_trips():
    assert from_dict({"inner": None}, WithSection).inner is None
    assert from_dict(to_dict(WithSection()), WithSection) == WithSection()
    with pytest.raises(ConfigError, match="'inner' must be a mapping"):
        from_dict({"inner": 3}, WithSection)


def test_files_a_recipe_reads_are_relative_to_the_recipe(tmp_path, monkeypatch):
    """A recipe works from any working directory: its input files resolve against its own folder;
    a value given on the command line (an override) resolves against the working directory."""
    from lpq.config import load_config
    from lpq.pipelines.ptq_config import PTQConfig

    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "r.yaml").write_text("quant: {format: hif4}\ncalibration: {text_file: data/calib.txt}\n"
                                   "algorithms: [{name: rtn}]\nevaluation: {wikitext2: ../test.txt}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(folder / "r.yaml", PTQConfig)
    assert cfg.calibration.text_file == folder / "data" / "calib.txt"
    assert cfg.evaluation.wikitext2 == tmp_path / "test.txt"
    cfg = load_config(folder / "r.yaml", PTQConfig, {"calibration.text_file": "mine.txt"})
    assert cfg.calibration.text_file == elsewhere / "mine.txt"
    assert cfg.output_dir == "runs/ptq"            # output folders stay relative to the working directory
