"""lpq.schema: the one enum convention (Choice) and the recipe version, through lpq.config's loader."""
import json
from dataclasses import dataclass

import pytest

from lpq.config import ConfigError, from_dict, load_config, to_dict
from lpq.schema import Choice, RecipeVersion, recipe_version


class Color(Choice):
    RED = "red"
    DARK_BLUE = "dark-blue"


@dataclass
class Root:
    version: RecipeVersion = RecipeVersion.V1
    color: Color = Color.RED

    def __post_init__(self) -> None:
        self.version = recipe_version(self.version)
        self.color = Color.parse(self.color, "color")


def test_a_choice_behaves_as_its_string():
    c = Color("dark-blue")
    assert c is Color.DARK_BLUE and c == "dark-blue" and hash(c) == hash("dark-blue")
    assert f"{c}" == str(c) == "dark-blue" and f"[{c:>10}]" == "[ dark-blue]" and repr(c) == "'dark-blue'"
    assert {"dark-blue": 1}[c] == 1 and json.dumps({c: [c]}) == '{"dark-blue": ["dark-blue"]}'


def test_choices_and_versions_load_and_round_trip(tmp_path):
    (tmp_path / "r.yaml").write_text("version: 1\ncolor: dark-blue\n")
    r = load_config(tmp_path / "r.yaml", Root)
    assert r == Root(RecipeVersion.V1, Color.DARK_BLUE) and to_dict(r) == {"version": 1, "color": "dark-blue"}
    (tmp_path / "old.yaml").write_text("color: red\n")            # no version: version 1
    assert load_config(tmp_path / "old.yaml", Root).version is RecipeVersion.V1


@pytest.mark.parametrize("text, message", [
    ("color: red\nversion: 2\n", r"r.yaml:2: 'version': 2 is not allowed; use one of 1$"),
    ("color: green\n", r"r.yaml:1: 'color': 'green' is not allowed; use one of 'red', 'dark-blue'$"),
])
def test_bad_values_name_file_line_key_and_allowed_values(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "r.yaml", Root)


def test_built_in_python_the_same_checks_apply():
    assert Root(color="red").color is Color.RED
    with pytest.raises(ValueError, match="color 'green' is not allowed; use one of 'red', 'dark-blue'"):
        Root(color="green")
    with pytest.raises(ValueError, match="recipe version 3 is not supported; this lpq reads version 1"):
        Root(version=3)
    assert from_dict({}, Root) == Root()
