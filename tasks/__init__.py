"""Built-in behaviors."""
