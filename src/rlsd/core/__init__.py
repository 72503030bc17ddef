"""Pure maths, no TRL and no trainer: credit rules, distillation losses, rollout losses, prompt selection and stage
schedules. Importing the package registers the family's further losses (`rlsd.core.family_losses`)."""

from rlsd.core import family_losses  # noqa: F401
