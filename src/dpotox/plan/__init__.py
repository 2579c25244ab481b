"""Planning: what the Snakefile imports to build the DAG.

The config and its schema (:mod:`.config`), the sweep condition names (:mod:`.conditions`),
each rule's output files (:mod:`.outputs`), cluster requests (:mod:`.resources`) and the
GPU-hour estimate (:mod:`.estimate`). Every cluster job parses the Snakefile, so nothing here
may import torch or transformers (a test checks it in a fresh interpreter).
"""
