"""``python -m services.orchestrator --help``: run the orchestrator until SIGTERM."""

from services.common.server import run_service
from services.orchestrator.config import OrchestratorConfig
from services.orchestrator.server import serve

if __name__ == "__main__":
    run_service(OrchestratorConfig.from_env_and_args, serve)
