"""The contract every layer of chla shares, at the bottom of the import graph: errors, atomic files,
the run directory with its chain and state files, progress, process helpers, the stage kinds'
params models, the recipe model and the tracking settings.

The launcher (login side), chla_train (job side) and chla_tools all import from here; nothing here
imports them, torch, or any other part of the training stack (tests/test_layers.py checks it).
"""
