"""docs/recipe-reference.md is generated from the typed config, and every recipe key has a docstring."""
from pathlib import Path

from pydantic import Field

from distill.cli import recipe_doc
from distill.config.schema import Role, Section

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "recipe-reference.md"


def test_committed_reference_is_up_to_date():
    fresh = recipe_doc.render()
    assert REFERENCE.read_text() == fresh, (
        f"docs/recipe-reference.md is out of date with the recipe models: run `{recipe_doc.COMMAND}` and commit it")


def test_every_recipe_field_has_a_docstring():
    missing = [f"{path or '<top level>'}.{name} ({model.__name__})" for path, model in recipe_doc.all_sections()
               for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"recipe fields without a docstring (write one under the field): {missing}"


def test_new_fields_and_sections_appear_without_touching_the_generator():
    class Inner(Section):
        depth: int = Field(3, ge=1)
        """How deep."""

    class Extra(Section):
        """A section of a trainer that does not exist."""

        mode: str | list[str] = "a"
        """The <mode>; a `<literal>` stays code."""
        inner: Inner = Inner()
        """Nested settings."""

    paths = [p for p, _ in recipe_doc.sections_of(Extra, "extra")]
    assert paths == ["extra", "extra.inner"]
    text = "\n".join(recipe_doc.sections_block(Extra, "extra", "####"))
    assert "| `mode` | str \\| list of str | `a` | The &lt;mode>; a `<literal>` stays code. |" in text
    assert "#### `extra.inner`" in text and "| `depth` | int (>= 1) | `3` | How deep. |" in text
    assert "A section of a trainer that does not exist." in text
    # Role fields are read from the model too: every one of them is in the reference.
    reference = REFERENCE.read_text()
    assert all(f"| `{name}` |" in reference for name in Role.model_fields)
