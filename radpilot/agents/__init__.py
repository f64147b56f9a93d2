"""Outer-loop agents: planners that turn evaluator feedback and memory into new objectives."""
