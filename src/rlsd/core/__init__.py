"""Pure maths, no TRL and no trainer: credit rules, distillation losses, rollout losses, prompt selection and stage
schedules."""
