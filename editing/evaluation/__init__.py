"""Edit-quality evaluation as the papers define it: datasets, metrics, and the runner."""
