from . import moe_transformer  # noqa: F401
