"""The review page: a physician watches a planning job, comments on it and approves the plan, in
a browser (no CDN, no JavaScript library), through the orchestrator's API."""
