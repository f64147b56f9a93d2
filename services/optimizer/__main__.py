"""``python -m services.optimizer --help``: run the optimizer server until SIGTERM."""

from services.common.server import run_service
from services.optimizer.config import OptimizerConfig
from services.optimizer.server import serve

if __name__ == "__main__":
    run_service(OptimizerConfig.from_env_and_args, serve)
