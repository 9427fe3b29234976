"""Control plane: CLI, experiment config, manifest, Ray connection, placement and the driver."""
