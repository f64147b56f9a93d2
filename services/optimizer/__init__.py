"""Optimizer service: prepares cases (dose influence matrices, from the case store) and runs FMO.

Physics: ``radpilot.fmo`` (solver, objective kinds, NumPy/CuPy backends) and ``radpilot.cases``.
"""
