"""Input validation, construction-time refusals and guards, sealed and verified checkpoints."""
