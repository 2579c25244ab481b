"""The workflow's stages: one module per stage, each with the function a rule's script in
``workflow/scripts/`` calls (probe, pairs, DPO, evaluation, activation caches, the neuron
table, the sweep specs). Each reads files, runs the engine and writes its outputs atomically."""
