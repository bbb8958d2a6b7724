"""Per-model virtualenvs cached by content: the key, the builder, the store."""
