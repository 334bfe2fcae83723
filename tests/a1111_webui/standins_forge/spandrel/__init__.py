"""Stand-in for spandrel (Forge Classic's modelloader imports it at the top; HeadsUp does not use it)."""
