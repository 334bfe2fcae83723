"""Stand-in for modules.ui."""
switch_values_symbol = "\U000021C5"
