"""Everything that runs on Ray: connecting to a cluster and placing work (``session``), the
teachers' Ray Data stages (``pipeline``), checks before a run (``prepare``), the soft-label cache
(``soft_labels``), the Ray Train loop (``train``) and its launcher (``distill``), Tune sweeps
(``sweep``, ``sweep_space``), teacher training (``teachers``) and fault drills (``faults``).
"""
