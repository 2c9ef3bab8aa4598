"""edge_pu: positive-unlabeled RL distillation for small language models on your own hardware.

Importing this package is cheap: it imports neither torch nor mlx. The heavy frameworks load
only when a backend, teacher or exporter that needs them is used.
"""

__version__ = "0.1.0"
