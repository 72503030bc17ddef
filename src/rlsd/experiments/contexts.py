"""The embedded task's context generators (`@context_generator`): deterministic stand-ins for the models that write
a generated context in the papers (a harness, a reflection, an annotator, a translator), built from the task's own
checker. Importing the method catalogue registers them."""

from __future__ import annotations

from rlsd.context.generated import GenerationRequest, context_generator  # noqa: F401
