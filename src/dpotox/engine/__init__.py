"""The engine that runs models: the architecture adapter (:mod:`.arch`), interventions as
data (:mod:`.spec`) applied by one hook engine (:mod:`.hooks`), batched generation
(:mod:`.generate`), the three metrics (:mod:`.metrics`) and FLOP counts (:mod:`.flops`).
Stages use it; it knows nothing of files, rules or the config."""
