"""tl: transfer learning for image classifiers, from YAML configs."""

__version__ = "0.1.0"
