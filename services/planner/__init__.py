"""Planner service: proposes the next objective weights and doses.

Agents: rules (default), LLM, Bayesian optimisation.
"""
