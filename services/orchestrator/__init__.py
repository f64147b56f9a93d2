"""Orchestrator service: the public API: cases, planning jobs, memory, persistence, export."""
