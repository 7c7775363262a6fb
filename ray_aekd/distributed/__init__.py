"""Everything that runs on Ray: connecting to a cluster and placing work (``session``), the
teachers' Ray Data stages (``pipeline``), checks before a run (``prepare``), the soft-label cache
(``soft_labels``), the Ray Train loop (``train``; one epoch of it without Ray: ``epochs``) and its
launcher (``distill``), Tune sweeps (``sweep``), teacher training (``teachers``),
the Tune callback that logs trials to MLflow (``tune_logging``) and fault drills (``faults``).
"""
