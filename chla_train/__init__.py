"""What runs inside a chla job: one module per stage kind (chla_train.stages) plus the shared
runtime (job entry, distributed bootstrap, checkpoints, metrics).

Importing this package imports no torch: the job entry must stay importable on a login node,
because submitit pickles it by reference when the chain is submitted.
"""
