"""RadPilot's gRPC services: optimizer, evaluator, planner, orchestrator.

Each wraps the planning core in ``radpilot`` (no physics lives here) with the same split:
``config.py`` / core / ``servicer.py`` / ``server.py`` / ``__main__.py``.
"""
