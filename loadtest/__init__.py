"""The load test's parts, one module per idea; load_test.py at the root is the command.

config (what a run is asked to do), names (the images and the names they go by),
outcomes (each request's outcome and verdict, the run's Report), client (HTTP to the
web tier), status (app-tier instances from /api/status), run (run_load), report (the
summary and JSON), plot (the --plot figure).
"""
