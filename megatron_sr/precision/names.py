"""The precision strategies' names, in the order a table or a plot lists them
(from fp32 down to pure bf16), and the default --precision. Torch-free, so that
tools read it without torch; `strategies.STRATEGIES` holds one row per name."""

STRATEGY_NAMES = ("fp32", "amp", "bf16-mixed", "bf16", "bf16-sr", "bf16-kahan")
DEFAULT_STRATEGY = "bf16-sr"
