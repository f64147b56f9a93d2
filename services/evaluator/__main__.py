"""``python -m services.evaluator --help``: run the evaluator server until SIGTERM."""

from services.common.server import run_service
from services.evaluator.config import EvaluatorConfig
from services.evaluator.server import serve

if __name__ == "__main__":
    run_service(EvaluatorConfig.from_env_and_args, serve)
