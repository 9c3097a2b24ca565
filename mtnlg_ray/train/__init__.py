"""Ray Train pretraining and fine-tuning: the loop, parallelism, schedule and checkpoints."""
