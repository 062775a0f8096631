"""`fastlearn recipes`: readable at 80 columns, names never cut, figures from the recipe files, one recipe in full."""
import pytest

from fastlearn.app.recipe_view import epochs_text, recipe_list, recipe_text, sizes_text
from fastlearn.core.recipes import list_recipes, load_recipe

NAMES = sorted(list_recipes())


@pytest.mark.parametrize("width", [80, 60])
def test_list_fits_the_width_and_never_cuts_a_name(width):
    text = recipe_list(width)
    lines = text.splitlines()
    assert max(map(len, lines)) <= width
    for name in NAMES:
        assert name in lines                                       # alone on its line, whole
    assert len(lines) < 12 * len(NAMES)


def test_list_prints_each_recipe_files_expected_text():
    flat = " ".join(recipe_list(80).split())                      # undo the wrapping
    for name in NAMES:
        r = load_recipe(name)
        assert f"expected: {' '.join(r.expected.split())}" in flat, name
        assert " ".join(r.description.split()) in flat and r.arch in flat


def test_list_wraps_to_a_wider_width():
    assert max(map(len, recipe_list(160).splitlines())) > 80


def test_epochs_and_sizes_in_words():
    assert epochs_text(load_recipe("imagenet_rn50_16")) == "16 epochs from scratch"
    assert epochs_text(load_recipe("linear_probe")) == "4 epochs, head only"
    assert epochs_text(load_recipe("digits")) == "1 head + 1/stage + 3 epochs, strategy full"
    assert sizes_text(load_recipe("imagenet_rn50_16")) == "160->192 px (valid 256)"
    assert sizes_text(load_recipe("digits")) == "64 px"


@pytest.mark.parametrize("name", NAMES)
def test_one_recipe_in_full_reads_back_as_the_same_recipe(name, tmp_path):
    text = recipe_text(name, 80)
    lines = text.splitlines()
    long = [line for line in lines if len(line) > 80 and not line.startswith("# from ")]
    assert not long, long                                          # wrapped, only the file's path may run on
    for key in load_recipe(name).to_dict():
        assert any(line.lstrip("# ").startswith(f"{key} = ") for line in lines), key
    p = tmp_path / "shown.toml"
    p.write_text(text)
    assert load_recipe(p) == load_recipe(name)                    # `fastlearn recipes X > my.toml` is a recipe


def test_one_recipe_shows_the_meaning_of_each_key():
    text = recipe_text("digits", 100)
    assert "size = 64" in text and "# final training resolution, px" in text
    assert "# drop_rate = (unset)" in text


@pytest.mark.parametrize("source, wrapped", [
    ('a "quoted" word, a back\\slash and ' + "long " * 29 + "end", True),
    ("runs of   spaces and a\ttab stay " + "long " * 30, False),               # cannot wrap without changing it: one line
])
def test_long_text_keeps_its_exact_value(tmp_path, source, wrapped):
    r = load_recipe("digits").replace(source=source)
    text = recipe_text(r, 60)
    assert ('source = """' in text) == wrapped
    p = tmp_path / "r.toml"
    p.write_text(text)
    assert load_recipe(p) == r


def test_every_key_meaning_is_shown_whole_at_80_columns():
    "Issue 22: meanings that run over several comment lines in `Recipe` were cut to their first line."
    from fastlearn.app.recipe_view import _field_comments
    text = recipe_text("transfer", 80)
    assert max(len(line) for line in text.splitlines() if not line.startswith("# from ")) <= 80
    notes = " ".join(line.rsplit("# ", 1)[1] for line in text.splitlines() if "# " in line)  # the comments, unwrapped
    assert ("... capped here: the largest fine-tuning LR measured good (higher ones broke the body on real photos: "
            "8.8e-3 sent clothing's valid loss from 0.41 to 7.6)") in notes
    assert "after the head on cached features; 1.0 measured best of 0.1-3 on real photos" in notes
    assert ("keep every checkpoint once the run has finished; false: only the last one stays (resume, inspection), "
            "the kept weights being model.safetensors") in notes
    for key, meaning in _field_comments().items():              # each whole, none spilled into the next key's
        assert meaning in notes, key
    assert "keep_checkpoints = false" in text
