"""``python -m services.planner --help``: run the planner server until SIGTERM."""

from services.common.server import run_service
from services.planner.config import PlannerConfig
from services.planner.server import serve

if __name__ == "__main__":
    run_service(PlannerConfig.from_env_and_args, serve)
