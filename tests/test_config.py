from pathlib import Path

import pytest

from seshu.config import PretrainRecipe, apply_overrides, dump_recipe, load_recipe, read_yaml
from seshu.errors import UserError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_inherit_merges_mappings_and_replaces_values(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "model: {arch: mixtral, preset: base}\ndata: {train: [a.txt, b.txt]}\n")
    (tmp_path / "tiny").mkdir()
    child = write(tmp_path / "tiny" / "r.yaml", "inherit: ../base.yaml\nmodel: {preset: tiny}\ndata: {train: c.txt}\n")
    recipe = load_recipe(PretrainRecipe, child)
    assert (recipe.model.arch, recipe.model.preset) == ("mixtral", "tiny")
    assert [s.path for s in recipe.data.train_sources()] == ["c.txt"]


def test_overrides_parse_yaml_values_and_reach_any_dotted_key(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "data: {train: a.txt}\n")
    recipe = load_recipe(
        PretrainRecipe,
        path,
        ["train.lr=3e-4", "train.gradient_checkpointing=true", "model.overrides.num_hidden_layers=3"],
    )
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.train.gradient_checkpointing is True
    assert recipe.model.overrides == {"num_hidden_layers": 3}


def test_sources_take_the_default_text_field_and_weights(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "data: {text_field: body, train: [a.jsonl, {path: b.jsonl, weight: 3}]}\n")
    sources = load_recipe(PretrainRecipe, path).data.train_sources()
    assert [(s.path, s.weight, s.text_field) for s in sources] == [("a.jsonl", 1.0, "body"), ("b.jsonl", 3.0, "body")]


def test_packaged_corpus_references_resolve_to_files(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "data: {train: 'seshu:corpus/hi.txt'}\n")
    source = load_recipe(PretrainRecipe, path).data.train_sources()[0]
    assert Path(source.path).is_file()


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("data: {train: a.txt}\ntrain: {lr: 1e-3, bogus: 1}\n", [], "unknown key 'train.bogus'"),
        ("data: {train: a.txt}\n", ["train.nope=1"], "unknown key 'train.nope'"),
        ("model: {arch: llama}\n", [], "missing required key 'data'"),
        ("data: {train: a.txt, validation: 1.5}\n", [], "'data.validation'"),
        ("data: {train: a.txt}\n", ["train.max_steps=0"], "'train.max_steps'"),
        ("data: {train: a.txt}\ntrain: {precision: fp8}\n", [], "'train.precision'"),
        ("data: [unclosed\n", [], "malformed YAML"),
        ("- just\n- a list\n", [], "must be a YAML mapping"),
        ("data: {train: a.txt}\n", ["novalue"], "expected key=value"),
    ],
)
def test_bad_recipes_give_one_line_naming_the_problem(
    tmp_path: Path, text: str, overrides: list[str], message: str
) -> None:
    path = write(tmp_path / "r.yaml", text)
    with pytest.raises(UserError) as err:
        load_recipe(PretrainRecipe, path, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_yaml_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "data:\n  train: a.txt\n  bad: [1, 2\n")
    with pytest.raises(UserError, match=r"line \d+"):
        read_yaml(path)


def test_missing_recipe_and_inherit_cycle(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="recipe file not found"):
        read_yaml(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "inherit: b.yaml\n")
    write(tmp_path / "b.yaml", "inherit: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        read_yaml(tmp_path / "a.yaml")


def test_dumped_recipe_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(PretrainRecipe, write(tmp_path / "r.yaml", "data: {train: a.txt}\n"), ["train.lr=0.01"])
    again = load_recipe(PretrainRecipe, write(tmp_path / "dumped.yaml", dump_recipe(recipe)))
    assert again == recipe


def test_apply_overrides_does_not_mutate_its_input() -> None:
    raw = {"train": {"lr": 1.0}}
    apply_overrides(raw, ["train.lr=2"])
    assert raw == {"train": {"lr": 1.0}}


def test_an_override_replaces_a_mapping_instead_of_merging_into_it(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "model: {overrides: {hidden_size: 32}}\ndata: {train: a.txt}\n")
    assert load_recipe(PretrainRecipe, path, ["model.overrides={}"]).model.overrides == {}
    assert load_recipe(PretrainRecipe, path, ["model.overrides.num_hidden_layers=1"]).model.overrides == {
        "hidden_size": 32,
        "num_hidden_layers": 1,
    }


def test_text_units_fill_pretraining_sources_and_are_refused_on_instruction_records() -> None:
    from seshu.config import SFTRecipe, validate

    data = {"train": ["a.txt", {"path": "b.txt", "text_unit": "paragraph"}], "text_unit": "line"}
    recipe = validate(PretrainRecipe, {"data": data}, "r.yaml")
    assert [e.text_unit for e in recipe.data.train_sources()] == ["line", "paragraph"]
    with pytest.raises(UserError, match="text_unit applies to plain-text pretraining sources"):
        validate(SFTRecipe, {"data": {"train": [{"path": "a.json", "text_unit": "line"}]}}, "r.yaml")
