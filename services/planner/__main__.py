"""``python -m services.planner [--address HOST:PORT]``."""

from __future__ import annotations

import logging

from services.common.server import wait_for_termination
from services.planner.config import PlannerConfig
from services.planner.server import serve


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = PlannerConfig.from_env_and_args()
    wait_for_termination(serve(config), config.grace_s)


if __name__ == "__main__":
    main()
