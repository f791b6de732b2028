# Before Prefect configures logging: awqflow's own loggers reach the UI too, and at INFO, so that learned
# rounding's progress lines show there and in the terminal (Prefect's own INFO lines stay off the CLI's).
import logging
import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "awqflow")
logging.getLogger("awqflow").setLevel(logging.INFO)
