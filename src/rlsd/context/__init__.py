"""What the teacher is shown: privileged-context sources, teacher templates, teacher-side transforms, vision inputs,
and the teacher prompts built from a rollout. Importing the package registers the built-in sources, those generated
during training included (`rlsd.context.generated`; MSD's parallel prompt, `rlsd.context.parallel`;
OPHSD's harness, `rlsd.context.harness`; RESD's reflections and playbook,
`rlsd.context.reflection`; VISD's judge, `rlsd.context.judge`)."""

from rlsd.context import (
    annotation,  # noqa: F401  (registers the "annotation" source: TRACE's key and error spans)
    contrast,  # noqa: F401  (registers the "contrast" source: RLCSD's hints)
    generated,  # noqa: F401  (registers nothing itself; the generated sources import it)
    harness,  # noqa: F401  (registers the "harness" source: OPHSD's harness context)
    judge,  # noqa: F401  (registers the "judge" source: VISD's structured feedback)
    parallel,  # noqa: F401  (registers the "parallel" source)
    reflection,  # noqa: F401  (registers the "reflection" source: RESD's reflections and playbook)
)
