"""What the teacher is shown: privileged-context sources, teacher templates, teacher-side transforms, vision inputs,
and the teacher prompts built from a rollout. Importing the package registers the built-in sources, those generated
during training included (`rlsd.context.generated`)."""

from rlsd.context import generated  # noqa: F401  (registers nothing itself; the generated sources import it)
