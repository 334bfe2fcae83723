"""Stand-in for modules.ui: the symbols the Upscale section imports."""
switch_values_symbol = "\U000021C5"
