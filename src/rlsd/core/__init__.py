"""Pure maths, no TRL and no trainer: credit rules, distillation losses, rollout losses, prompt selection and stage
schedules. Importing the package registers the family's further losses (`rlsd.core.family_losses`, GUI-SD's
`rlsd.core.gui_sd`) and RLCSD's and
SRPO's credit rules (`rlsd.core.contrast_rule`, `rlsd.core.srpo_rule`)."""

from rlsd.core import (
    contrast_rule,  # noqa: F401  (registers the "rlcsd" credit rule)
    family_losses,  # noqa: F401
    gui_sd,  # noqa: F401  (registers the "gui_sd" distillation loss)
    srpo_rule,  # noqa: F401  (registers the "srpo" credit rule)
)
