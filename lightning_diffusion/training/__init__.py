"""Training infrastructure shared by the three models: exact resume, the non-finite-loss guard, safe checkpoint IO,
experiment tracking, run logs and SLURM requeue/job helpers."""
