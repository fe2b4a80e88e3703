"""User-facing errors: the CLI turns these into a one-line reason and a non-zero exit."""


class PipelineError(RuntimeError):
    """A problem with the user's input or environment (bad file, missing weights, ...)."""
