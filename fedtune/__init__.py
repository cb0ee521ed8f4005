"""fedtune: federated, differentially private LoRA fine-tuning of language models on Flower.

The library holds all logic; ``server/`` and ``client/`` wire it into Flower apps and
``fedtune`` (fedtune.cli) is the command line.
"""

__version__ = "0.1.0"
