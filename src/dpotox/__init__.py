"""dpotox: how DPO reduces toxicity, neuron by neuron.

The package holds all logic of the workflow; ``workflow/rules/*.smk`` only call it.
"""

__version__ = "0.1.0"
