"""The errors a user acts on; a leaf module every layer may import."""
from __future__ import annotations


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key and the fix."""
