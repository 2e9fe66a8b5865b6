"""The recipe: its typed schema, loading and validation, shipped presets, name registries and the one error type."""
