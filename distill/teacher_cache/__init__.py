"""The teacher cache: the teacher's top-k distributions on disk, its format and its reader (offline KD)."""
