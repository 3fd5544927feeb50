"""Running a command: CI gates, reports and plots, sweeps, loggers, training guards, config validation and preflight."""
