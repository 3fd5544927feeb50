"""The lowest layer: errors, registries, metric names and schemas, the checkpoint schema, console and safe output writes. Imports nothing else from tl_cli."""
