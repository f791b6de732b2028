# Before Prefect configures logging: awqflow's own loggers (learned rounding's steps) reach the UI too.
import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "awqflow")
