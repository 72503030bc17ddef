"""What the teacher is shown: privileged-context sources, teacher templates, teacher-side transforms, vision inputs,
and the teacher prompts built from a rollout."""
