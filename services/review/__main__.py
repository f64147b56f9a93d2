"""``python -m services.review --help``: serve the review page until SIGTERM."""

from services.common.server import run_service
from services.review.config import ReviewConfig
from services.review.server import serve

if __name__ == "__main__":
    run_service(ReviewConfig.from_env_and_args, serve)
