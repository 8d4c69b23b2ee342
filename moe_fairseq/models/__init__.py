from . import moe_transformer  # noqa: F401
from . import moec_transformer  # noqa: F401
from . import smoe_transformer  # noqa: F401
