from . import guard, moe_cross_entropy, moe_label_smoothed_cross_entropy  # noqa: F401

guard.install()
