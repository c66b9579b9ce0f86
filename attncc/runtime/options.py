"""Compatibility name: `CompileOptions` and `BACKENDS` live in `attncc.options` (below every
stage, since the schedule builder, codegen and the runtime all read them)."""
from ..options import BACKENDS, CompileOptions, _pow2  # noqa: F401
