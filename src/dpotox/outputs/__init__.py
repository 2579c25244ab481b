"""What only writes outputs: the neuron statistics, the result tables, the claims table and
the figures. Everything here reads the stages' CSV and Parquet tables, never a model, so each
output is redrawn in seconds without recomputing anything upstream."""
