"""Planner service: proposes the next objective weights and doses (rules, LLM or Bayesian optimisation)."""
