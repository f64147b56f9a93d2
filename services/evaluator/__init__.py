"""Evaluator service: DVH, metrics, protocol check and dose images for a plan.

Physics: ``radpilot.evaluation`` (dvh, metrics, protocol_check, images).
"""
