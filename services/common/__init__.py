"""Wiring shared by the four servers: server construction, error mapping, health, shutdown."""
